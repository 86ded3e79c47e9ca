"""``purifytf app``: a web page where a person attacks an image and watches each purifier clean it.

:mod:`purifytf.app.logic` computes the page (no Gradio); :mod:`purifytf.app.page` lays it out with Gradio
(the optional ``app`` extra, imported only when a page is built) and serves it offline.
"""

from .page import add_arguments, build_page, launch, run

__all__ = ["add_arguments", "build_page", "launch", "run"]
