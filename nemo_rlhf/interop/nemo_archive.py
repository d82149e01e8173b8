"""The files of a NeMo 1.x ``.nemo`` checkpoint: a tar (NeMo tars its folder with ``arcname="."``,
uncompressed since NeMo 1.7, gzipped before) or the extracted folder (nemo_rlhf/interop/nemo.py
reads the members)."""
from __future__ import annotations

import contextlib
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

from nemo_rlhf.errors import CheckpointError


class NemoArchive:
    """Read members of a .nemo tar or of its extracted directory."""

    def __init__(self, path):
        self.path = Path(path)
        self._tar = None
        if self.path.is_file():
            try:
                self._tar = tarfile.open(self.path, "r:*")
            except tarfile.TarError as e:
                raise CheckpointError(f"{self.path}: not a .nemo archive ({e})") from None
            # NeMo tars its folder with arcname=".": members are "./model_config.yaml", ...
            self._names = {_member_name(m.name): m for m in self._tar.getmembers() if m.isfile()}
        else:
            self._names = {str(p.relative_to(self.path)): p for p in self.path.rglob("*") if p.is_file()}

    def names(self):
        return sorted(self._names)

    def has(self, name: str) -> bool:
        return name in self._names

    def read(self, name: str) -> bytes:
        if name not in self._names:
            raise CheckpointError(f"{self.path}: no {name} inside (has {self.names()[:10]})")
        if self._tar is None:
            return self._names[name].read_bytes()
        return self._tar.extractfile(self._names[name]).read()

    @contextlib.contextmanager
    def folder(self, name: str):
        """The directory ``name`` of the archive on disk: itself for an extracted .nemo; for a tar,
        extracted once per host (by each host's local rank 0 when torch.distributed runs) into a
        temporary directory that is removed after every rank is done with it."""
        if self._tar is None:
            yield self.path / name
            return
        import socket

        import torch.distributed as dist

        multi = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        extracts = not multi or int(os.environ.get("LOCAL_RANK", "0")) == 0   # no LOCAL_RANK: every rank
        tmp, error = None, None
        try:
            if extracts:
                tmp = tempfile.mkdtemp(prefix="nemo_rlhf_nemo_")
                try:
                    for member_name, member in self._names.items():
                        if member_name.startswith(name + "/"):
                            target = Path(tmp) / member_name
                            target.parent.mkdir(parents=True, exist_ok=True)
                            with self._tar.extractfile(member) as src, open(target, "wb") as dst:
                                shutil.copyfileobj(src, dst)
                except OSError as e:
                    error = f"{type(e).__name__}: {e}"
            if multi:
                host = socket.gethostname()
                everyone = [None] * dist.get_world_size()
                dist.all_gather_object(everyone, (host, tmp, error))
                errors = [e for _, _, e in everyone if e]
                mine = [t for h, t, _ in everyone if h == host and t is not None]
                if errors or not mine:
                    raise CheckpointError(f"{self.path}: could not extract {name}/ "
                                          f"({errors[0] if errors else 'no rank of this host did'})")
                tmp = tmp or mine[0]
            elif error:
                raise CheckpointError(f"{self.path}: could not extract {name}/ ({error})")
            yield Path(tmp) / name
        finally:
            if multi:
                dist.barrier()       # nobody reads the extracted files any more
            if extracts and tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)


def _member_name(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")
