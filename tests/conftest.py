"""Session-wide test environment: offline, single-threaded BLAS per process, throwaway Prefect/torch homes."""

import os
import tempfile

pytest_plugins = ["tests.s3server"]

_home = tempfile.mkdtemp(prefix="leanpo-tests-")
for key, value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "PREFECT_HOME": os.path.join(_home, "prefect"),
    # Prefect 3.7 keeps task results in ~/.prefect/storage whatever PREFECT_HOME says: a cache shared across
    # sessions would serve one test run's results to the next.
    "PREFECT_RESULTS_LOCAL_STORAGE_PATH": os.path.join(_home, "prefect", "storage"),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "TORCH_EXTENSIONS_DIR": os.path.join(_home, "torch_extensions"),
}.items():
    os.environ.setdefault(key, value)



def pytest_sessionfinish(session, exitstatus):
    """Hand Prefect's console handlers the real stderr before pytest closes the captured stream they hold: the
    temporary server's atexit hook logs "Stopping temporary server" after that, which printed a "--- Logging
    error ---" traceback at the end of every run."""
    import logging
    import sys

    if "prefect.logging.handlers" not in sys.modules:
        return
    from prefect.logging.handlers import PrefectConsoleHandler

    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", ()):
            if isinstance(handler, PrefectConsoleHandler):
                handler.stream = sys.__stderr__  # not setStream(): it flushes the old stream, perhaps closed
                handler.console.file = sys.__stderr__  # it prints through a rich Console holding the stream too
