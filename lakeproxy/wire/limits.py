"""Protocol constants and the bounds lakeproxy enforces at the edge.

Sources: PostgreSQL src/include/libpq/pqcomm.h and
https://www.postgresql.org/docs/current/protocol-message-formats.html
"""

from typing import Final

#: Largest startup packet accepted (PostgreSQL's MAX_STARTUP_PACKET_LENGTH).
MAX_STARTUP_PACKET: Final = 10_000
#: Largest tagged message accepted during the startup phase (auth, params, errors).
MAX_STARTUP_PHASE_MESSAGE: Final = 1 << 20
#: Largest cancel key (protocol 3.2 allows up to 256 bytes).
MAX_CANCEL_KEY: Final = 256

PROTOCOL_3_0: Final = (3 << 16) | 0
PROTOCOL_3_2: Final = (3 << 16) | 2
#: Request codes carried in the "version" slot of untagged packets (pqcomm.h).
CANCEL_REQUEST_CODE: Final = (1234 << 16) | 5678
SSL_REQUEST_CODE: Final = (1234 << 16) | 5679
GSSENC_REQUEST_CODE: Final = (1234 << 16) | 5680

#: Authentication request codes (the Int32 after tag 'R').
AUTH_OK: Final = 0
AUTH_CLEARTEXT_PASSWORD: Final = 3
AUTH_MD5_PASSWORD: Final = 5
AUTH_SASL: Final = 10
AUTH_SASL_CONTINUE: Final = 11
AUTH_SASL_FINAL: Final = 12
