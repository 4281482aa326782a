"""Every config key path the README and docs/ name (`clients.max_bytes_in_flight`,
`listeners[].proxy_protocol_from`, ...) is a key of the config: a renamed key must not
leave the documents pointing at nothing."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel

from relay.config.load import _model_of
from relay.config.schema import Settings

REPO = Path(__file__).parents[2]
DOCUMENTS = [
    REPO / "README.md",
    REPO / "HACKING.md",
    *sorted((REPO / "docs").glob("*.md")),
    *sorted((REPO / "deploy").rglob("README.md")),
]
_FILE = re.compile(r"\.(py|ya?ml|crt|key|pem|json|md|tf|txt|sh)$")  # `tls.crt` is a file, not a key
_PATH = re.compile(r"`([a-z_]+(?:\[\d*\])?(?:\.[a-z_]+(?:\[\d*\])?)+)")


def resolves(path: str) -> bool:
    model: type[BaseModel] = Settings
    for part in re.sub(r"\[\d*\]", "", path).split("."):
        field = model.model_fields.get(part)
        if field is None:
            return bool(model.model_config.get("extra") == "allow")  # limits.users.<username>
        inner = _model_of(field.annotation)
        if inner is None:
            return True  # a value: what follows (if anything) is not a key
        model = inner
    return True


def test_every_config_key_path_in_the_documents_exists():
    top = set(Settings.model_fields)
    missing = []
    for document in DOCUMENTS:
        for path in sorted(set(_PATH.findall(document.read_text()))):
            if path.split(".")[0].split("[")[0] in top and not _FILE.search(path) and not resolves(path):
                missing.append(f"{document.name}: {path}")
    assert not missing, "key paths that are not in the config:\n" + "\n".join(missing)
