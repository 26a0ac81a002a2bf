"""What every configuration model shares: strict models, relative paths, topic-level names.

Relative paths resolve against the directory of the file they appear in: the loader
(`config_loader.py`) passes that directory as the validation context `base_dir`; without a
context they are kept as written. The context also says which checks of this machine to run:
`check_files` (referenced files exist) and `check_local` (environment and writable paths, for
`validate-config` and `run`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationInfo

# Names that become MQTT topic levels: no '/', '+', '#', spaces or empty strings.
TOPIC_LEVEL = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


def resolve_path(value: Path, info: ValidationInfo) -> Path:
    """Resolve a relative path against the config file's directory (context `base_dir`)."""
    value = Path(os.path.expanduser(str(value)))
    base = (info.context or {}).get("base_dir")
    if base is not None and not value.is_absolute():
        value = Path(os.path.normpath(Path(base) / value))
    return value


def check_files(info: ValidationInfo) -> bool:
    return bool((info.context or {}).get("check_files"))


def check_local(info: ValidationInfo) -> bool:
    """Checks of this machine's state (environment, writable paths): validate-config and run."""
    return bool((info.context or {}).get("check_local"))


ConfigPath = Annotated[Path, AfterValidator(resolve_path)]


class StrictModel(BaseModel):
    """Unknown keys are rejected: a typo in a YAML file fails loudly, never silently."""

    model_config = ConfigDict(extra="forbid")
