"""The one place where sidetune meets the releases of its dependencies: the start-up check that refuses a version
outside the declared range, and the adaptations to API differences inside that range.

The ranges live in pyproject.toml only. `check_versions` reads them from the source tree's pyproject.toml when
sidetune runs from a checkout (what the code beside it declares), else from the installed distribution's metadata
(generated from the same file), and compares each with the installed version; the first mismatch is one line naming
the package, the version found and the range.

Adaptations detect a feature, never a version number, so a backport or a patch release is read as it is:
- transformers 5.0-5.23 call the KV cache `past_key_values` (forward argument and output field); 5.24+ call it
  `cache` and keep `past_key_values` as a deprecated alias until 5.40. `cache_kwargs` / `returned_cache`.
- transformers before 5.15 drop every cache inside gradient-checkpointed blocks (no `_can_checkpoint_with_cache`
  opt-out). `block_checkpointing_keeps_cache` says whether the installed one can keep a read-only prefix cache.
- transformers 5.0-5.3 ask a cache layer for its mask sizes with the new tokens' `cache_position` tensor, 5.4+ with
  their count; `query_count` reads either. A cache layer's maximum length is `get_max_cache_shape` before 5.13,
  `get_max_length` after (the prefix cache layer defines both).
"""

from __future__ import annotations

import functools
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from sidetune.errors import SidetuneError

DIST = "sidetune"


# ---------------------------------------------------------------------------------------------------------------------
# Declared ranges, checked at start (CLI entry and sidetune.load)


def declared_requirements() -> list[str]:
    """The runtime requirements (no extras) as written in pyproject.toml, e.g. ["torch>=2.6", ...]."""
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    if pyproject.is_file() and sys.version_info >= (3, 11):
        import tomllib

        project = tomllib.loads(pyproject.read_text()).get("project", {})
        if project.get("name") == DIST:
            return list(project.get("dependencies", []))
    try:
        requires = metadata.requires(DIST) or []
    except metadata.PackageNotFoundError:
        return []  # neither installed nor a readable checkout: nothing declares a range to check against
    return [r for r in requires if "extra" not in r.partition(";")[2]]


def installed_version(name: str) -> str | None:
    """The installed distribution's version, or None. One function so that a test can mock it."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def version_problem(requirement: str) -> str | None:
    """One line if the installed version of `requirement`'s package is outside its range, else None. A package that
    is not installed is left to its import: bitsandbytes, for one, is imported only for a quantized model or an
    8-bit optimizer."""
    from packaging.requirements import Requirement
    from packaging.version import InvalidVersion, Version

    req = Requirement(requirement)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        return None
    found = installed_version(req.name)
    if found is None:
        return None
    wanted = requirement.partition(";")[0].replace(" ", "")  # as pyproject.toml writes it
    try:
        ok = req.specifier.contains(Version(found), prereleases=True)
    except InvalidVersion:
        return None  # not a PEP 440 version (a vendor build): nothing to compare it with
    if not ok:
        return (f"{req.name} {found} is installed, but sidetune supports {wanted}; install a version in that range: "
                f"pip install '{wanted}'")
    return None


def check_versions() -> None:
    """Raise SidetuneError (one line) for the first declared dependency whose installed version is out of range."""
    for requirement in declared_requirements():
        problem = version_problem(requirement)
        if problem is not None:
            raise SidetuneError(problem)


# ---------------------------------------------------------------------------------------------------------------------
# transformers' KV cache


@functools.cache
def cache_arg() -> str:
    """The name transformers' models give the KV cache, as a forward argument and as an output field."""
    from transformers.modeling_outputs import BaseModelOutputWithPast

    return "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """The keyword argument that hands `cache` to a transformers model's forward."""
    return {cache_arg(): cache}


def returned_cache(output: Any) -> Any:
    """The cache a transformers model's forward returned (use_cache=True)."""
    return getattr(output, cache_arg())


@functools.cache
def block_checkpointing_keeps_cache() -> bool:
    """Whether transformers' GradientCheckpointingLayer can be told to keep a cache under checkpointing."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return hasattr(GradientCheckpointingLayer, "_can_checkpoint_with_cache")


def query_count(query: Any) -> int:
    """The number of new tokens a cache layer's get_mask_sizes is asked about: an int (5.4+) or the new tokens'
    cache_position tensor (5.0-5.3)."""
    return query if isinstance(query, int) else int(query.shape[0])
