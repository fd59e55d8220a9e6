"""One seam per foreign system (Docker Engine, registry HTTP API), each behind a Protocol
(``worker.seams.protocols``) and turning foreign errors into ``worker.core.errors``. Seams take
plain values (a host, a CA, a credential), never database rows; they import only ``worker.core``."""
