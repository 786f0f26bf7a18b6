-- Niki's enqueue as one MariaDB/MySQL stored procedure: the client row lock, the queue
-- cap, the duplicate rule, the INSERT and the COMMIT in one round trip (one CALL).
-- The server creates it at start if it is missing (it needs the CREATE ROUTINE privilege;
-- without it, enqueue runs the same statements one by one). To create it by hand, run
-- this file as one statement, e.g. `mariadb --delimiter='$$' dbname < enqueue_mysql.sql`.
--
-- The name carries a version: callers (servers, enqueuers of any version) call it by name,
-- and a server never replaces a procedure that exists, so that a rolling upgrade never
-- drops one under a running caller. Any change to the parameters, the result or the
-- behaviour takes a new name (MysqlStorage.ENQUEUE_PROCEDURE).
--
-- Result: one row (result, owner_server_id, owner event_host, owner event_port, session,
-- previous):
--   result > 0: the new pending message's id; 0: stored as 'ignored' (a duplicate);
--   -1: no such client (nothing stored); -2: the queue is full (nothing stored).
--   The owner's address is NULL unless that server's heartbeat is fresh.
--   session: the client's session; previous: its newest pending message before this one
--   (0: none); both read under the client row's lock, both 0 unless result > 0.
-- It is sent after the COMMIT: a caller that reads it knows the message is committed.
CREATE PROCEDURE niki_enqueue_v3(
    IN p_client BIGINT,
    IN p_body TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin,
    IN p_hash BINARY(32),
    IN p_window_us BIGINT,   -- the duplicate window
    IN p_ttl_us BIGINT,      -- NULL: never expires
    IN p_cap BIGINT,         -- max_pending; NULL: no cap
    IN p_stale_us BIGINT)    -- an owner whose heartbeat is older is dead
    MODIFIES SQL DATA
    SQL SECURITY INVOKER
BEGIN
    DECLARE v_found INT DEFAULT 0;
    DECLARE v_owner BIGINT DEFAULT NULL;
    DECLARE v_session BIGINT DEFAULT 0;
    DECLARE v_host VARCHAR(255) DEFAULT NULL;
    DECLARE v_port INT DEFAULT NULL;
    DECLARE v_count BIGINT DEFAULT 0;
    DECLARE v_recent BIGINT DEFAULT NULL;
    DECLARE v_previous BIGINT DEFAULT NULL;
    DECLARE v_result BIGINT DEFAULT 0;
    -- A SELECT … INTO that finds no row leaves the variable as it was.
    DECLARE CONTINUE HANDLER FOR NOT FOUND BEGIN END;
    -- Any error: nothing of this call stays, no lock is kept, and the caller gets the error.
    DECLARE EXIT HANDLER FOR SQLEXCEPTION BEGIN ROLLBACK; RESIGNAL; END;

    START TRANSACTION;
    checks: BEGIN
        -- The client row, locked until COMMIT: one client's enqueues run one at a time.
        SELECT 1, owner_server_id, session INTO v_found, v_owner, v_session
            FROM clients WHERE id = p_client FOR UPDATE;
        IF v_found = 0 THEN
            SET v_result = -1;
            LEAVE checks;
        END IF;
        -- Under that lock, in one statement: the duplicate rule (an accepted message with
        -- the same body within the window), the client's newest pending message, and the
        -- queue cap's count from the index (pending rows, expired or not, up to the cap).
        SELECT (SELECT id FROM messages WHERE client_id = p_client AND body_hash = p_hash
                    AND (status = 'delivered'
                         OR (status = 'pending' AND (expires_at IS NULL OR expires_at > NOW(6))))
                    AND created_at > NOW(6) - INTERVAL p_window_us MICROSECOND LIMIT 1),
               (SELECT MAX(id) FROM messages WHERE client_id = p_client AND status = 'pending'),
               IF(p_cap IS NULL, 0, (SELECT COUNT(*) FROM (SELECT 1 FROM messages
                    WHERE client_id = p_client AND status = 'pending' LIMIT p_cap) AS capped))
            INTO v_recent, v_previous, v_count;
        -- Only a client at the cap by that count is counted again, without the pending
        -- rows whose TTL has passed (the purger has not marked them expired yet).
        IF v_count >= p_cap THEN
            SELECT COUNT(*) INTO v_count FROM (SELECT 1 FROM messages WHERE client_id = p_client
                AND status = 'pending' AND (expires_at IS NULL OR expires_at > NOW(6))
                LIMIT p_cap) AS capped;
            IF v_count >= p_cap THEN
                SET v_result = -2;
                LEAVE checks;
            END IF;
        END IF;
        -- Every stored message writes the client row: on a Galera cluster, two nodes'
        -- enqueues for one client then conflict at commit and one runs again, after the
        -- other, with a higher id; so one client's ids follow the order of the commits on
        -- every node (a lock taken by FOR UPDATE alone is the local node's only).
        UPDATE clients SET queued_count = queued_count + 1 WHERE id = p_client;
        -- A duplicate is stored too, as 'ignored', for the record.
        INSERT INTO messages (client_id, body, body_hash, status, created_at, expires_at)
            VALUES (p_client, p_body, p_hash, IF(v_recent IS NULL, 'pending', 'ignored'), NOW(6),
                    IF(p_ttl_us IS NULL, NULL, NOW(6) + INTERVAL p_ttl_us MICROSECOND));
        IF v_recent IS NOT NULL THEN
            SET v_result = 0;
            LEAVE checks;
        END IF;
        SET v_result = LAST_INSERT_ID();
        -- The owner's wake-up address, if it is alive (a plain read: no lock on servers).
        IF v_owner IS NOT NULL THEN
            SELECT event_host, event_port INTO v_host, v_port FROM servers
                WHERE id = v_owner AND heartbeat_at > NOW(6) - INTERVAL p_stale_us MICROSECOND;
        END IF;
    END checks;
    COMMIT;
    SELECT v_result, v_owner, v_host, v_port, IF(v_result > 0, v_session, 0),
           IF(v_result > 0, COALESCE(v_previous, 0), 0);
END
