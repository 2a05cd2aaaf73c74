"""The names of the paper protocol, importable without torch (``asyndm paper --help``)."""

from __future__ import annotations

__all__ = ["PAPER_METHODS", "PAPER_METRICS", "PAPER_SUITES"]

PAPER_SUITES = ("animal", "drawbench", "geneval", "mscoco")
"""The paper's prompt sets, shipped in ``asyndm/bench/paper_prompts/``."""
PAPER_METHODS = ("dm", "dm_concave", "asyndm", "cfgpp", "s_cfg", "z_sampling", "seg", "pag",
                 "attend_excite")
"""The methods of the paper's Table 1 and the two nearest alignment methods users know."""
PAPER_METRICS = ("imagereward", "openclip", "bertscore", "qwenscore")
"""The AsynDM paper's Table 1 metrics, in its order."""
