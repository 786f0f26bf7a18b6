-- Niki's SQLite schema: the same tables as schema_mysql.sql (the top-level schema.sql).
-- Applied by the server at start; every statement is idempotent.

CREATE TABLE IF NOT EXISTS clients (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    session       INTEGER NOT NULL DEFAULT 0,   -- bumped on each identification
    owner_server_id INTEGER,                    -- servers.id holding its connection; NULL: offline
    delivery_session INTEGER,                   -- the session holding the delivery lease (see STORAGE.md)
    delivery_server_id INTEGER,                 -- servers.id of that session; a dead server's lease is free
    lease_wanted_at TEXT,                       -- when a newer session first found the lease held
    queued_count  INTEGER NOT NULL DEFAULT 0,   -- messages stored for it (see schema_mysql.sql)
    secret_hash   BLOB,                         -- sha256 of its credential's secret; NULL: bare id
    created_at    TEXT    NOT NULL,
    last_seen_at  TEXT
);

CREATE INDEX IF NOT EXISTS clients_by_owner ON clients (owner_server_id);

CREATE TABLE IF NOT EXISTS messages (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    client_id     INTEGER NOT NULL,
    body          TEXT    NOT NULL,
    body_hash     BLOB    NOT NULL,             -- sha256 of the body, for the duplicate rule
    status        TEXT    NOT NULL DEFAULT 'pending'
                  CHECK (status IN ('pending', 'delivered', 'ignored', 'expired')),
    created_at    TEXT    NOT NULL,
    expires_at    TEXT,                         -- NULL: never; past it, never sent
    delivered_at  TEXT,
    acknowledged_at TEXT                        -- an ACK client confirmed it (ACK mode only)
);

CREATE INDEX IF NOT EXISTS messages_pending_by_client ON messages (client_id, status, id);

CREATE INDEX IF NOT EXISTS messages_duplicate_check ON messages (client_id, body_hash, created_at);

CREATE INDEX IF NOT EXISTS messages_by_status_expiry ON messages (status, expires_at);

CREATE INDEX IF NOT EXISTS messages_by_status_age ON messages (status, created_at);

CREATE TABLE IF NOT EXISTS servers (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    host          TEXT    NOT NULL,             -- host name, for operators
    port          INTEGER NOT NULL,
    event_host    TEXT    NOT NULL,             -- where enqueuers send its wake-ups; with
                                                -- event_port, identifies a server across restarts
    event_port    INTEGER NOT NULL,
    pid           INTEGER NOT NULL,
    started_at    TEXT    NOT NULL,
    heartbeat_at  TEXT    NOT NULL
);

CREATE INDEX IF NOT EXISTS servers_by_address ON servers (event_host, event_port);

CREATE TABLE IF NOT EXISTS secrets (
    name          TEXT    PRIMARY KEY,          -- 'wakeup': signs wake-ups that carry a message
    value         BLOB    NOT NULL
);
