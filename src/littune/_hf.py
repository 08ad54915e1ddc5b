"""Keep Hugging Face loaders quiet and offline-friendly (no progress bars or load reports)."""


def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
