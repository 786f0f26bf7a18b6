from messaging_server import enqueue


def test_transcript(server):
    with server.connect() as c:
        cid = c.handshake()
        assert enqueue(cid, "hello", db=server.db_url, peers=server.peers)
        assert c.read_line() == "MESSAGE: hello"
