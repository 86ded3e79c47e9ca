"""One configuration system for everything that is saved: purifiers and diffusion backbones.

A :class:`Configurable` describes itself by :attr:`~Configurable.config`, a JSON dict that names its
class (``"_class_name"``, as diffusers writes it) and holds its settings; nested parts (a purifier's
backbone, SSNI's base purifier) are configs of their own. :meth:`~Configurable.from_config` rebuilds
the object from it (weights random or empty) and :meth:`~Configurable.from_pretrained` from a folder
or Hub repo (``config.json`` + ``model.safetensors``, loaded strictly), without being told the class:
``Purifier.from_pretrained(path)`` returns whatever purifier was saved there. Keyword arguments that
cannot live in JSON (a classifier module) reach every nested part that takes them.

Settings are read *live*: a constructor argument stored as an attribute of the same name is saved with
its current value (``purifier.seed = 3`` is saved); one without such an attribute is fixed at
construction (e.g. an architecture) and saved as it was given. Values that are modules or callables
(a classifier, a ``stages`` function) are not saved: pass them again when loading.
"""

# No `from __future__ import annotations`: the Hub mixin reads constructor annotations at run time.
import inspect
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from huggingface_hub import PyTorchModelHubMixin, constants, hf_hub_download
from safetensors import SafetensorError
from torch import nn

__all__ = ["CLASS_KEY", "Configurable", "Pretrained", "config_class", "read_config", "set_downloader"]

CLASS_KEY = "_class_name"
"""Key of ``config.json`` naming the saved class."""

_CLASSES: dict[str, type] = {}
_LEGACY_NESTED = ("class", "config")  # nested purifiers as saved before CLASS_KEY existed


def legacy_steps_to_fractions(config: dict[str, Any], keys: tuple[str, ...], num_steps: int = 1000) -> dict[str, Any]:
    """``config`` with its noise settings ``keys`` saved as steps of T = ``num_steps`` (before class names were
    recorded) converted to fractions of T. Only values of magnitude above 1 are steps (a fraction of T is at most 1,
    and 0 is 0 in both units), so a current config without its class name is never rescaled."""
    return {**config, **{k: config[k] / num_steps for k in keys if abs(config.get(k) or 0) > 1}}


def config_class(name: str) -> type:
    """The :class:`Configurable` class saved under ``name`` (every subclass registers itself)."""
    if name not in _CLASSES:
        raise ValueError(f"config names unknown class {name!r}; known: {sorted(_CLASSES)}")
    return _CLASSES[name]


def _hf_download(repo_id: str, filename: str, **download) -> Path:
    return Path(hf_hub_download(repo_id, filename, **download))


_DOWNLOAD: list[Callable[..., Path]] = [_hf_download]


def set_downloader(download: Callable[..., Path]) -> None:
    """Route the Hub downloads of ``from_pretrained`` through ``download(repo_id, filename, **options)``.

    :mod:`purifytf.hub` installs its ``hub_download`` (one download path with clear errors) when imported,
    which ``import purifytf`` does; this module stays below it in the import graph.
    """
    _DOWNLOAD[0] = download


def _hub_file(name_or_path: str | Path, filename: str, download: dict) -> Path:
    """``filename`` of a local folder (``~`` expanded), or of a Hub repo (downloaded or from the cache)."""
    name_or_path = os.path.expanduser(name_or_path)
    if os.path.isdir(name_or_path):
        return Path(name_or_path) / filename
    text, exists = str(name_or_path), os.path.exists(name_or_path)
    if exists or os.path.isabs(text) or text.startswith((".", "~")) or text.count("/") > 1:
        what = "not a folder" if exists else "no such folder"
        raise FileNotFoundError(f"{text}: {what} (a saved model is a folder; a Hub repo id is OWNER/NAME)")
    return _DOWNLOAD[0](str(name_or_path), filename, **download)


def read_config(name_or_path: str | Path, **download) -> dict:
    """``config.json`` of a saved folder or Hub repo id (``download``: ``hf_hub_download`` options)."""
    path = _hub_file(name_or_path, constants.CONFIG_NAME, download)
    if not path.is_file():
        raise FileNotFoundError(f"{name_or_path}: no {constants.CONFIG_NAME} (not a saved purifytf model)")
    return json.loads(path.read_text())


class _Unsaved:
    """Marker of a setting that does not travel in JSON (a module, a callable)."""


def _encode(value: Any) -> Any:
    if isinstance(value, Configurable):
        return value.config
    if isinstance(value, nn.Module) or callable(value):
        return _Unsaved
    if isinstance(value, tuple):
        return list(value)
    return value


def _is_nested(value: Any) -> bool:
    return isinstance(value, dict) and (CLASS_KEY in value or set(value) == set(_LEGACY_NESTED))


class Pretrained(PyTorchModelHubMixin):
    """The Hub mixin, loading from a local folder or a Hub repo id with clear errors (a mistyped folder is not
    sent to the Hub), strictly, from safetensors only."""

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        strict: bool = True,
        map_location: str = "cpu",
        force_download: bool = False,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        revision: str | None = None,
        **kwargs,
    ):
        """Load from a local folder or a Hub repo id (``config.json`` + ``model.safetensors``).

        Weights load strictly (missing or unexpected ones are an error). ``kwargs`` go to the constructor with
        the saved config (:class:`Configurable`: settings that are not saved, such as ``classifier=`` for a
        saliency purifier, or overrides, and ``optional``; see :meth:`Configurable.from_config`).
        """
        download = {"force_download": force_download, "token": token, "cache_dir": cache_dir,
                    "local_files_only": local_files_only, "revision": revision}
        model = cls._from_saved_config(read_config(pretrained_model_name_or_path, **download), **kwargs)
        weights = _hub_file(pretrained_model_name_or_path, constants.SAFETENSORS_SINGLE_FILE, download)
        return cls._load_as_safetensor(model, str(weights), map_location, strict)

    @classmethod
    def _from_saved_config(cls, config: dict, **kwargs):
        """The model of a saved ``config.json`` (its constructor's arguments), before its weights load."""
        return cls(**config, **kwargs)

    @classmethod
    def _load_as_safetensor(cls, model, model_file, map_location, strict):
        try:
            return super()._load_as_safetensor(model, model_file, map_location, strict)
        except SafetensorError as err:
            raise ValueError(f"{model_file}: not a valid safetensors file (corrupt or truncated?): {err}") from err


class Configurable(Pretrained):
    """Base of every saved part; see the module doc. Subclasses register under their class name."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _CLASSES[cls.__name__] = cls

    # --- describing --------------------------------------------------------------------------
    @classmethod
    def _settings(cls) -> list[str]:
        """Constructor parameters that form the config."""
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        return [p.name for p in list(cls._hub_mixin_init_parameters.values())[1:] if p.kind in kinds]

    @property
    def config(self) -> dict[str, Any]:
        """``{"_class_name": ..., setting: value, ...}``, JSON, with the current values (see the module doc)."""
        given = self._hub_mixin_config or {}
        config: dict[str, Any] = {CLASS_KEY: type(self).__name__}
        for name in self._settings():
            value = _encode(getattr(self, name)) if hasattr(self, name) else given.get(name, _Unsaved)
            if value is not _Unsaved:
                config[name] = value
        return config

    # --- rebuilding --------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: dict[str, Any], *, optional: tuple[str, ...] = (), **kwargs) -> "Configurable":
        """Rebuild the object ``config`` describes (weights random or empty).

        ``config`` must name ``cls`` or a subclass; configs that name no class (written before class
        names were recorded) are read as ``cls``'s, converted by :meth:`_upgrade_legacy`. ``kwargs`` go to
        every part (this one or nested) whose constructor takes them; one no part takes is an error, unless
        ``optional`` names it (what a caller offers every kind of purifier, e.g. a command line's classifier).
        """
        used: set[str] = set()
        built = cls._build_config(config, kwargs, used)
        unused = sorted(set(kwargs) - used - set(optional))
        if unused:
            raise TypeError(f"{type(built).__name__}.from_config: no part takes {unused}")
        return built

    @classmethod
    def _resolve(cls, config: dict[str, Any]) -> tuple[type, dict[str, Any]]:
        """The class a config names and the config in the current format."""
        if set(config) == set(_LEGACY_NESTED):  # a nested purifier as saved before class names
            target = config_class(config["class"])
            config = target._upgrade_legacy(dict(config["config"]))
        elif CLASS_KEY in config:
            target = config_class(config[CLASS_KEY])
        else:
            target = cls._legacy_class(config)
            config = target._upgrade_legacy(dict(config))
        if not issubclass(target, cls):
            raise TypeError(f"the config describes a {target.__name__}, not a {cls.__name__}")
        return target, {k: v for k, v in config.items() if k != CLASS_KEY}

    @classmethod
    def _legacy_class(cls, config: dict[str, Any]) -> type:
        """The class of a config that names none (saved before class names were recorded)."""
        if cls.__dict__.get("_abstract_config", False):
            raise ValueError(f"the config names no class ({CLASS_KEY!r} missing: saved before class names were "
                             f"recorded); load it through its own class, e.g. DiffPurify.from_pretrained(path)")
        return cls

    @classmethod
    def _upgrade_legacy(cls, config: dict[str, Any]) -> dict[str, Any]:
        """Convert a config saved before class names were recorded to the current settings (units)."""
        return config

    @classmethod
    def _build_config(cls, config: dict[str, Any], kwargs: dict[str, Any], used: set[str]) -> "Configurable":
        target, config = cls._resolve(config)
        return target._build(config, kwargs, used)

    @classmethod
    def _build(cls, config: dict[str, Any], kwargs: dict[str, Any], used: set[str]) -> "Configurable":
        """``cls(**settings)``: nested configs rebuilt, ``kwargs`` this class takes added."""
        params = cls._settings()
        unknown = sorted(set(config) - set(params))
        if unknown:
            raise ValueError(f"{cls.__name__} config has settings {unknown} that its constructor does not take")
        args = {name: cls._decode(name, value, kwargs, used) for name, value in config.items()}
        taken = {name: value for name, value in kwargs.items() if name in params}
        used.update(taken)
        required = cls._hub_mixin_init_parameters
        missing = [n for n in params if required[n].default is inspect.Parameter.empty and n not in {**args, **taken}]
        if missing:
            raise TypeError(f"loading a {cls.__name__} needs {', '.join(f'{n}=...' for n in missing)}: not saved in "
                            f"config.json (a module's architecture is not JSON; its weights are loaded from the file)")
        return cls(**{**args, **taken})

    @classmethod
    def _decode(cls, name: str, value: Any, kwargs: dict[str, Any], used: set[str]) -> Any:
        """A setting as the constructor takes it: nested configs (also those of a legacy format, recognised
        by the parameter's annotation) rebuilt."""
        annotation = cls._hub_mixin_init_parameters[name].annotation
        if _is_nested(value):
            return Configurable._build_config(value, kwargs, used)
        if isinstance(value, dict) and isinstance(annotation, type) and issubclass(annotation, Configurable):
            return annotation._build_config(value, kwargs, used)
        return value

    # --- saving and loading ------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | Path, **kwargs):
        """Write ``config.json`` (:attr:`config`), ``model.safetensors`` and the model card (Hub mixin)."""
        return super().save_pretrained(save_directory, config=self.config, **kwargs)

    @classmethod
    def _from_saved_config(cls, config: dict, **kwargs) -> "Configurable":
        return cls.from_config(config, **kwargs)
