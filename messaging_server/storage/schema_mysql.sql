-- Niki's MySQL / MariaDB schema (InnoDB, utf8mb4 so that 4-byte characters survive).
-- The server applies it at start; every statement is idempotent.
-- messaging_server/storage/schema_sqlite.sql is the SQLite equivalent.

CREATE TABLE IF NOT EXISTS clients (
    id            BIGINT      NOT NULL AUTO_INCREMENT,
    session       BIGINT      NOT NULL DEFAULT 0,   -- bumped on each identification
    owner_server_id BIGINT    NULL,                 -- servers.id holding its connection; NULL: offline
    delivery_session BIGINT   NULL,                 -- the session holding the delivery lease (see STORAGE.md)
    delivery_server_id BIGINT NULL,                 -- servers.id of that session; a dead server's lease is free
    lease_wanted_at DATETIME(6) NULL,               -- when a newer session first found the lease held
    queued_count  BIGINT      NOT NULL DEFAULT 0,   -- messages stored for it; every enqueue writes the
                                                    -- row, so that one client's enqueues on different
                                                    -- Galera nodes conflict (see STORAGE.md, rule 7)
    secret_hash   BINARY(32)  NULL,                 -- sha256 of its credential's secret; NULL: bare id
    created_at    DATETIME(6) NOT NULL,
    last_seen_at  DATETIME(6) NULL,
    PRIMARY KEY (id),
    KEY clients_by_owner (owner_server_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE IF NOT EXISTS messages (
    id            BIGINT      NOT NULL AUTO_INCREMENT,
    client_id     BIGINT      NOT NULL,
    body          TEXT        NOT NULL,
    body_hash     BINARY(32)  NOT NULL,             -- sha256 of the body, for the duplicate rule
    status        ENUM('pending', 'delivered', 'ignored', 'expired') NOT NULL DEFAULT 'pending',
    created_at    DATETIME(6) NOT NULL,
    expires_at    DATETIME(6) NULL,                 -- NULL: never; past it, never sent
    delivered_at  DATETIME(6) NULL,
    acknowledged_at DATETIME(6) NULL,               -- an ACK client confirmed it (ACK mode only)
    PRIMARY KEY (id),
    KEY messages_pending_by_client (client_id, status, id),
    KEY messages_duplicate_check (client_id, body_hash, created_at),
    KEY messages_by_status_expiry (status, expires_at),
    KEY messages_by_status_age (status, created_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE IF NOT EXISTS servers (
    id            BIGINT       NOT NULL AUTO_INCREMENT,
    host          VARCHAR(255) NOT NULL,             -- host name, for operators
    port          INT          NOT NULL,
    event_host    VARCHAR(255) NOT NULL,             -- where enqueuers send its wake-ups; with
                                                     -- event_port, identifies a server across restarts
    event_port    INT          NOT NULL,
    pid           INT          NOT NULL,
    started_at    DATETIME(6)  NOT NULL,
    heartbeat_at  DATETIME(6)  NOT NULL,
    PRIMARY KEY (id),
    KEY servers_by_address (event_host, event_port)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE IF NOT EXISTS secrets (
    name          VARCHAR(64)   NOT NULL,          -- 'wakeup': signs wake-ups that carry a message
    value         VARBINARY(64) NOT NULL,
    PRIMARY KEY (name)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
