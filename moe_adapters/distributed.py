"""One conversion split across processes or nodes (torchrun, or any launcher that sets RANK and WORLD_SIZE).

Every rank plans the same conversion from headers (planning is deterministic), writes its share of the output
files into one shared temporary folder, and leaves a small JSON note of what it wrote (sizes, sha256). Rank 0
waits for every note, writes the index and manifest last, and renames the folder into place; a failing rank leaves
a note saying why, which rank 0 reports. Notes are JSON, never pickles, and no process group is needed: the
temporary folder on the shared filesystem is the only channel.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

from .errors import DestinationError, OptionError
from .execute import Written
from .plan import OutFile

POLL_SECONDS = 0.2
NOTICE_SECONDS = 15.0  # say what we wait for once this long has passed


@dataclass(frozen=True)
class Share:
    rank: int = 0
    world: int = 1
    run_id: str = ""

    @classmethod
    def from_env(cls) -> "Share":
        world, rank = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0)
        if world <= 1:
            return cls()
        if not 0 <= rank < world:
            raise OptionError(f"RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world})")
        run = os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("MOE_ADAPTERS_RUN_ID")
        if not run or run == "none":
            run = f"{os.environ.get('MASTER_ADDR', 'local')}-{os.environ.get('MASTER_PORT', '0')}"
        return cls(rank, world, hashlib.sha256(run.encode()).hexdigest()[:12])

    @property
    def active(self) -> bool:
        return self.world > 1

    def tmp_name(self, dst: str) -> str:
        parent, name = os.path.split(os.path.abspath(dst))
        return os.path.join(parent, f".{name}.tmp-moe_adapters-dist-{self.run_id}")

    def mine(self, files: list[OutFile]) -> list[OutFile]:
        """This rank's files: largest first to the least loaded rank (the same answer on every rank)."""
        load = [0] * self.world
        owner: dict[str, int] = {}
        for f in sorted(files, key=lambda f: (-f.size, f.name)):
            r = min(range(self.world), key=lambda i: (load[i], i))
            owner[f.name] = r
            load[r] += f.size
        return [f for f in files if owner[f.name] == self.rank]

    def _note(self, tmp: str, rank: int, kind: str) -> str:
        return os.path.join(tmp, f".moe_adapters-rank{rank:05d}.{kind}.json")

    def _waiting(self, started: float, what: str) -> float:
        """Say once, after a while, what this process waits for: a stray WORLD_SIZE otherwise looks like a hang."""
        if started and time.monotonic() - started > NOTICE_SECONDS:
            sys.stderr.write(
                f"moe-adapters: rank {self.rank} of WORLD_SIZE={self.world} is waiting for {what} (a split conversion; "
                "unset WORLD_SIZE for a one-process run)\n"
            )
            return 0.0
        return started

    def wait_for_folder(self, tmp: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        started = time.monotonic()
        while not os.path.isdir(tmp):
            started = self._waiting(started, "rank 0")
            if time.monotonic() > deadline:
                raise DestinationError(f"rank 0 did not create the shared temporary folder in {timeout:.0f} s", file=tmp)
            time.sleep(POLL_SECONDS)

    def publish(self, tmp: str, written: dict[str, Written], hashes: dict[str, dict[str, str]]) -> None:
        body = {
            "written": {n: [w.size, w.sha256, w.tensor_sha256] for n, w in written.items()},
            "source_tensor_sha256": hashes,
        }
        self._write_note(tmp, "done", body)

    def fail(self, tmp: str, message: str) -> None:
        if os.path.isdir(tmp):
            self._write_note(tmp, "failed", {"error": message})

    def _write_note(self, tmp: str, kind: str, body: dict[str, Any]) -> None:
        path = self._note(tmp, self.rank, kind)
        with open(path + ".part", "w") as f:
            json.dump(body, f)
        os.replace(path + ".part", path)  # a note is complete or absent

    def gather(self, tmp: str, timeout: float) -> tuple[dict[str, Written], dict[str, dict[str, str]]]:
        """Rank 0: wait for every other rank's note; merge what they wrote."""
        written: dict[str, Written] = {}
        hashes: dict[str, dict[str, str]] = {}
        deadline = time.monotonic() + timeout
        started = time.monotonic()
        for r in range(1, self.world):
            done, failed = self._note(tmp, r, "done"), self._note(tmp, r, "failed")
            while not os.path.exists(done):
                started = self._waiting(started, f"rank {r}")
                if os.path.exists(failed):
                    raise DestinationError(f"rank {r} failed: {json.load(open(failed))['error']}", file=tmp)
                if time.monotonic() > deadline:
                    raise DestinationError(f"rank {r} did not finish in {timeout:.0f} s", file=tmp)
                time.sleep(POLL_SECONDS)
            with open(done) as f:
                body = json.load(f)
            os.unlink(done)
            for n, (size, sha, tensors) in body["written"].items():
                written[n] = Written(n, size, sha, tensors)
            for path, d in body["source_tensor_sha256"].items():
                hashes.setdefault(path, {}).update(d)
        return written, hashes


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    try:
        return int(text) if text else default
    except ValueError:
        raise OptionError(f"{name}={text!r} in the environment is not a whole number") from None


def timeout_seconds() -> float:
    return float(os.environ.get("MOE_ADAPTERS_DIST_TIMEOUT", "3600"))
