"""Recovery directories: the data of uploads that failed, kept on the host.

The core copies a file's written bytes there when its upload fails, with a
`.source` note beside the copy that names the file's path in the sandbox
(see StagedFile.save_recovery). `sandboxfs list` shows them so that no copy
is forgotten.
"""

from __future__ import annotations

import dataclasses
import os

NOTE_SUFFIX = ".source"


@dataclasses.dataclass(frozen=True)
class KeptCopy:
    """One copy in a recovery directory."""

    path: str
    size: int
    # The file's path in the sandbox, from the note; "" when the note is missing.
    sandbox_path: str


def kept_copies(directory: str) -> list[KeptCopy]:
    """Return the copies in `directory`, oldest first; none if it does not exist."""
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    copies = []
    for name in names:
        path = os.path.join(directory, name)
        if name.endswith(NOTE_SUFFIX) or not os.path.isfile(path):
            continue
        copies.append(KeptCopy(path, os.path.getsize(path), _sandbox_path(path + NOTE_SUFFIX)))
    return copies


def _sandbox_path(note: str) -> str:
    try:
        with open(note, encoding="utf-8", errors="surrogateescape") as file:
            for line in file:
                if line.startswith("sandbox path: "):
                    return line[len("sandbox path: ") :].rstrip("\n")
    except OSError:
        pass
    return ""
