"""Errors that mean "the input is wrong", as opposed to a bug: launchers print them as one line.

* :class:`ConfigError` -- an invalid config field; the message starts with ``config.<field>``.
* :class:`prefjax.data.DataError` -- a malformed input row (file, line, field).
* :class:`prefjax.train.workdir.WorkdirError` -- a run directory that belongs to another run,
  or a resumption that would mix two configs or datasets.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """An invalid config field; the message starts with ``config.<field>``."""
