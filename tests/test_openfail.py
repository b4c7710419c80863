"""Channel-open failures as sentences (pure)."""

from tunneld import openfail


def test_a_name_the_server_cannot_resolve_is_not_nothing_listening():
    for reason in ("Name or service not known", "nodename nor servname provided, or not known",
                   "Temporary failure in name resolution", "No address associated with "
                   "hostname"):
        text = openfail.describe("node8", 8201, openfail.CONNECT_FAILED, reason)
        assert "could not resolve 'node8'" in text and "listening" not in text, text


def test_refused_and_prohibited():
    text = openfail.describe("localhost", 8090, openfail.CONNECT_FAILED, "Connection refused")
    assert "is anything listening on localhost:8090 on the server?" in text
    text = openfail.describe("::1", 80, openfail.ADMINISTRATIVELY_PROHIBITED, "")
    assert "does not allow connections to [::1]:80" in text and "PermitOpen" in text


def test_a_refused_unix_socket_names_the_path_and_the_server_setting():
    text = openfail.describe_path("~/s/app.sock", "/home/me/s/app.sock",
                                  openfail.CONNECT_FAILED, "open failed")
    assert text.startswith("the server could not connect to the Unix socket ~/s/app.sock "
                           "(/home/me/s/app.sock) (open failed)"), text
    assert "no such socket" in text and "`AllowStreamLocalForwarding no` (sshd_config)" in text
    text = openfail.describe_path("/run/a.sock", "/run/a.sock", openfail.CONNECT_FAILED, "")
    assert "Unix socket /run/a.sock (refused)" in text
    text = openfail.describe_path("/run/a.sock", "/run/a.sock",
                                  openfail.ADMINISTRATIVELY_PROHIBITED, "prohibited")
    assert "does not allow connections to the Unix socket /run/a.sock" in text
    assert "AllowStreamLocalForwarding" in text
