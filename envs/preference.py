"""Preference pairs for DPO-style training: (prompt, chosen, rejected) triples, and an HH-RLHF loader.

HH-RLHF stores two whole transcripts per record. The prompt is everything up to and including the last
``"\\n\\nAssistant:"``; the responses are what follows it. A record whose two transcripts disagree before
that point is not a pair under this convention: it is skipped with a warning naming its line (or raises,
with ``on_mismatch="error"``).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Iterator, Sequence

from dare_gym.envs.data import (
    DataFormatError,
    DataNotFoundError,
    local_lookup,
    read_jsonl,
    require_fields,
    resolve_local_file,
    where,
)

ASSISTANT_TURN = "\n\nAssistant:"
HH_SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str


class PreferenceDataset(Sequence[PreferencePair]):
    """An indexable list of :class:`PreferencePair`, with where it came from and what was skipped."""

    def __init__(self, pairs: Sequence[PreferencePair], *, source: str = "memory",
                 skipped: Sequence[tuple[int, str]] = ()):
        self.pairs = list(pairs)
        self.source = source
        self.skipped = list(skipped)  # (line number, reason)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index):
        return self.pairs[index]

    def __iter__(self) -> Iterator[PreferencePair]:
        return iter(self.pairs)

    @classmethod
    def from_records(cls, records: Sequence[dict], *, source: str = "memory") -> "PreferenceDataset":
        """From records that already hold ``prompt``, ``chosen`` and ``rejected`` fields."""
        require_fields(records, {"prompt": str, "chosen": str, "rejected": str}, source)
        pairs = [PreferencePair(record["prompt"], record["chosen"], record["rejected"]) for record in records]
        return cls(pairs, source=source)


def split_transcript(transcript: str) -> tuple[str, str]:
    """(prompt up to and including the last Assistant turn marker, the final response)."""
    cut = transcript.rfind(ASSISTANT_TURN)
    if cut < 0:
        raise ValueError("no '\\n\\nAssistant:' turn in the transcript")
    cut += len(ASSISTANT_TURN)
    return transcript[:cut], transcript[cut:]


def hh_rlhf_pairs(records: Sequence[dict], *, source: str, on_mismatch: str = "skip") -> PreferenceDataset:
    if on_mismatch not in ("skip", "error"):
        raise ValueError(f"on_mismatch must be 'skip' or 'error', got {on_mismatch!r}")
    require_fields(records, {"chosen": str, "rejected": str}, source)  # a wrong layout is an error, never skipped
    pairs, skipped = [], []
    for position, record in enumerate(records):
        number = position + 1
        try:
            prompt, chosen = split_transcript(record["chosen"])
            other_prompt, rejected = split_transcript(record["rejected"])
            if prompt != other_prompt:
                raise ValueError("chosen and rejected transcripts differ before their last Assistant turn")
        except ValueError as error:
            reason = f"{type(error).__name__}: {error}"
            if on_mismatch == "error":
                raise DataFormatError(f"{where(records, position, source)}: {reason}") from None
            skipped.append((number, reason))
            continue
        pairs.append(PreferencePair(prompt, chosen, rejected))
    if skipped:
        warnings.warn(f"{source}: skipped {len(skipped)} of {len(records)} HH-RLHF records that are not clean pairs "
                      f"(records {[n for n, _ in skipped[:10]]}{'…' if len(skipped) > 10 else ''})", stacklevel=3)
    return PreferenceDataset(pairs, source=source, skipped=skipped)


def load_hh_rlhf(subset: str = "harmless-base", split: str = "test", *, data_files: str | os.PathLike | None = None,
                 on_mismatch: str = "skip") -> PreferenceDataset:
    """HH-RLHF preference pairs from ``data_files`` (JSONL, optionally gzipped), else
    ``$DARE_GYM_DATA_DIR/hh_rlhf/<subset>_<split>.jsonl.gz``, else the hub dataset ``Anthropic/hh-rlhf``."""
    if subset not in HH_SUBSETS:
        raise ValueError(f"subset must be one of {HH_SUBSETS}, got {subset!r}")
    relative_path = f"hh_rlhf/{subset}_{split}.jsonl.gz"
    path = resolve_local_file(data_files, relative_path)
    if path is not None:
        return hh_rlhf_pairs(read_jsonl(path), source=str(path), on_mismatch=on_mismatch)

    def hub_records() -> list[dict]:
        import datasets

        try:
            return [dict(r) for r in datasets.load_dataset("Anthropic/hh-rlhf", data_dir=subset, split=split)]
        except Exception as error:  # noqa: BLE001 - re-raised with where else the data was looked for
            raise DataNotFoundError(f"no local {relative_path} and could not load Anthropic/hh-rlhf ({subset}, "
                                    f"{split}) from the Hugging Face hub ({type(error).__name__}: {error}). "
                                    f"{local_lookup(relative_path)}") from error

    return hh_rlhf_pairs(hub_records(), source=f"hub:Anthropic/hh-rlhf/{subset}", on_mismatch=on_mismatch)


__all__ = ["PreferencePair", "PreferenceDataset", "load_hh_rlhf", "split_transcript"]
