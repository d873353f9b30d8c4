"""LeanPO core library: every pipeline stage as plain Python, runnable without Prefect.

Where things are:
    config   one pydantic config per stage            schemas  the Parquet tables and their versions
    io       atomic Parquet on a folder or S3         models   one adapter per Video-LLM family
    toy      tiny offline models and test clips       logps    response-only log-probs (no prompt logits)
    loss     LeanPO, SimPO and DPO objectives         toyworld an SFT model that sees the synthetic clips
    stats    intervals: Wilson, paired bootstrap, McNemar
    registry the trained models, their lineage, the current one per alias (promote/reject/rollback)
This package never imports Prefect (tasks/ and flows/ wrap it), so GPU workers and launchers import it bare.
"""

__version__ = "0.1.0"
