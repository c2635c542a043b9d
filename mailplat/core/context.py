"""What every service is handed at start: config, the store, the clock and the DNS resolver.

The supervisor builds one Context per process; adapters pass it to core.  Tests inject a
clock or resolver here, nowhere else.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..config import Config
from ..resolver import make_resolver
from ..store.db import Store


@dataclass
class Context:
    config: Config
    store: Store
    clock: Callable[[], float] = time.time
    resolver: Any = None
    # Ports actually bound, by service name (api, smtp, submission, ...).
    ports: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        if self.resolver is None:
            self.resolver = make_resolver(self.config.dns)
