import pytest

from nodeagent import security as sec


@pytest.fixture(scope="module")
def contexts(tmp_path_factory):
    """(a server context for n1, a peer client context for n2), from a fresh cluster CA."""
    d = tmp_path_factory.mktemp("tls")
    sec.init_tls(d, "t", [("n1", "127.0.0.1"), ("n2", "127.0.0.1")])
    server = sec.server_context(*sec.tls_paths_for_node(d, "n1"))
    client = sec.peer_client_context(*sec.tls_paths_for_node(d, "n2"))
    return server, client
