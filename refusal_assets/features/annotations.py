"""Human labels of latents, and the one-line description every latent gets.

``configs/annotations/<model_key>.yaml`` (optional) maps site -> latent -> label::

    resid12:
      417: "harm-topic words (weapons, drugs)"
      1033: "the assistant header; refusal opener"

It is validated like every config: YAML read through :func:`refusal_assets.config.read_yaml`
(duplicate keys refused), then a strict schema; an unknown site, a latent outside ``[0, d_sae)`` or
an empty label is a :class:`~refusal_assets.config.ConfigError` naming the file and the key.
A latent's description is its label, else what it fires on and what it promotes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from pydantic import ConfigDict, RootModel, StringConstraints, ValidationError
from typing_extensions import Annotated

from refusal_assets.config import ConfigError, read_yaml

Label = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]


class _SiteLabels(RootModel[dict[int, Label]]):
    model_config = ConfigDict(frozen=True)


class AnnotationFile(RootModel[dict[str, _SiteLabels]]):
    """site name (``resid12``) -> latent index -> label."""

    model_config = ConfigDict(frozen=True)


def annotation_path(project_root: Path, model_key: str) -> Path:
    return Path(project_root) / "configs" / "annotations" / f"{model_key}.yaml"


def load_annotations(path: Path, d_sae: Mapping[str, int | None]) -> dict[str, dict[int, str]]:
    """Labels per site name from ``path`` (``{}`` when the file does not exist). ``d_sae``:
    site name -> latent count of the model's sites (None: not checked); any other site, or a
    latent out of range, is an error."""
    path = Path(path)
    if not path.is_file():
        return {}
    raw = read_yaml(path)
    if raw is None:
        return {}
    try:
        parsed = AnnotationFile.model_validate(raw)
    except ValidationError as e:
        lines = [
            # pydantic marks a bad mapping key with a '[key]' step; the file's key path is enough
            f"{path}: key '{'.'.join(str(p) for p in err['loc'] if p != '[key]')}': {err['msg']}"
            for err in e.errors()
        ]
        raise ConfigError("invalid annotations:\n  " + "\n  ".join(lines)) from None
    out: dict[str, dict[int, str]] = {}
    for site, labels in parsed.root.items():
        if site not in d_sae:
            raise ConfigError(
                f"{path}: key '{site}': not a site of this model (its sites: {sorted(d_sae)})"
            )
        for latent, label in labels.root.items():
            n = d_sae[site]
            if latent < 0 or (n is not None and latent >= n):
                raise ConfigError(
                    f"{path}: key '{site}.{latent}': latent out of range; "
                    f"the {site} SAE has latents 0..{(n or 0) - 1}"
                )
        out[site] = dict(labels.root)
    return out


def describe_latent(
    annotation: str | None,
    live: bool,
    context_tokens: list[str],
    promoted_tokens: list[str],
    n_tokens: int = 4,
) -> str:
    """One line: the annotation, else the tokens the latent fires on most (``context_tokens``, from
    its top examples) and the tokens its decoder direction promotes (logit lens)."""
    if annotation:
        return annotation
    if not live:
        return "dead: never fires on the stored rows"
    fires = ", ".join(repr(t) for t in context_tokens[:n_tokens])
    promotes = ", ".join(repr(t.strip() or t) for t in promoted_tokens[:n_tokens])
    return f"fires on {fires}; promotes {promotes}"
