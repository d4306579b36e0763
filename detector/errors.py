"""The exceptions rnnsentry raises on purpose.

    RnnsentryError
     +-- ConfigError        a configuration file, variable or flag is wrong
     +-- ModelFileError     a model artifact is missing, corrupt or inconsistent
     +-- PayloadError       one message cannot be scored (carries a rejection reason)
     +-- DataError          an input file (CSV) cannot be used

Start-up errors (config, model, data) are fatal with one clear line; a
PayloadError is counted under its reason and never stops the daemon.
"""

from __future__ import annotations

from typing import Final


class RnnsentryError(Exception):
    """Base of every error rnnsentry raises deliberately."""


class ConfigError(RnnsentryError):
    """A configuration value is missing, unknown or out of range."""


class ModelFileError(RnnsentryError):
    """A model file cannot be used; the message says which check failed."""


class DataError(RnnsentryError):
    """An input data file cannot be used; the message says why."""


# The closed set of reasons a message is rejected for (a metric label set).
REJECTION_REASONS: Final = (
    "decode",  # not UTF-8 / not JSON
    "schema",  # JSON of the wrong shape, missing or wrong-typed fields
    "non_finite",  # NaN or infinity among the values
    "too_large",  # payload above the size limit, or too many samples in a batch
    "out_of_order",  # timestamp older than the stream's last one
    "duplicate",  # timestamp equal to the stream's last one, or an older sample the broker
    # sends again (a QoS 1 redelivery: it was scored before)
    "unknown_route",  # topic matches no model's template
    "unpublishable",  # the stream's alert or score topic would break MQTT's limits
    "bad_timestamp",  # ts not a time, not after 1970, or too far ahead of its receipt
    "model_non_finite",  # the network produced NaN/inf for this sample (state kept)
)


class PayloadError(RnnsentryError):
    """One message is rejected; ``reason`` is one of :data:`REJECTION_REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in REJECTION_REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
