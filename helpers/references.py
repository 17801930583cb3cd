"""The papers' own numbers, each with its section, from one file: `references/papers.yaml`.

Notebooks, claims and figures print them beside ours with the profile named; nothing else in the
package holds a paper number. Also the one rule every claim table judges an effect by against the
paper's (`effect_verdict`), used by `helpers.compare` and `helpers.task_zsq`.
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


# A claim "holds" only with an effect of the paper's order: at least this share of the paper's
# relative effect, in the claimed direction and beyond the spread. A right direction with a smaller
# (or unseparated) effect is its own verdict, "direction only", never "holds".
EFFECT_SHARE = 1 / 3
VERDICTS = ("holds", "direction only", "does not hold")


def effect_verdict(ours: float, spread: float, paper: float | None, share: float = EFFECT_SHARE) -> str:
    """Verdict on a signed effect (positive = the claim's direction), all relative to their baseline.

    ours / paper: our and the paper's effect as a share of mAP (e.g. 0.38 for a 12-point gap on 31.2);
    spread: the noise on ours in the same unit. `paper=None` (the paper gives no number) judges the
    direction and the separation only.
    """
    if ours <= 0:
        return "does not hold"
    large = paper is None or ours >= share * paper
    return "holds" if ours > spread and large else "direction only"
