"""The code location: ``refusal_assets.definitions:defs`` for the config in ``$REFUSAL_ASSETS_CONFIG``
(default ``configs/default.yaml``)."""

from refusal_assets.app.settings import load_project, storage_root
from refusal_assets.defs.build import build_defs

_cfg = load_project()
defs = build_defs(_cfg, storage_root(_cfg))
