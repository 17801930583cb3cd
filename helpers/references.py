"""The papers' own numbers, each with its section, from one file: `references/papers.yaml`.

Notebooks, claims and figures print them beside ours with the profile named; nothing else in the
package holds a paper number.
"""
from __future__ import annotations

from functools import lru_cache

import yaml

from helpers.runs import ROOT

PAPERS = ROOT / "references" / "papers.yaml"


@lru_cache(maxsize=None)
def _all() -> dict:
    return yaml.safe_load(PAPERS.read_text())


def paper(name: str) -> dict:
    """One paper's numbers ("zsq_infrared_retinanet", "df_mpc", ...); a fresh copy, safe to modify."""
    papers = _all()
    if name not in papers:
        raise KeyError(f"no paper {name!r} in {PAPERS.name}; it has {sorted(papers)}")
    import copy
    return copy.deepcopy(papers[name])
