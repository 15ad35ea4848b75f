"""The ``bklit`` admin command, run as a subprocess against real Redis and ClickHouse.

Exit codes: 0 done, 1 failed (a server cannot be reached, nothing matches),
2 usage or configuration error.  Keys go to stdout alone; details to stderr.
"""

import json
import os
import re
import time

import pytest

from bklit.schema import MIGRATIONS, TABLES
from bklit.tokens import key_digest, token_key
from harness import bklit
from servers import free_port

KEY = re.compile(r"bk_[A-Za-z0-9_-]{40}")


def create(redis_url, *args):
    """Create a key with ``bklit token create``; the key."""
    done = bklit("token", "create", "--redis", redis_url, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def listed(redis_url):
    """``bklit token list --json``, parsed."""
    done = bklit("token", "list", "--json", "--redis", redis_url)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def tables(clickhouse_server, database):
    """The tables of ``database``."""
    return set(clickhouse_server.query(f"SHOW TABLES FROM {database}").split())


class TestTokenCreate:
    """``bklit token create``."""

    def test_prints_only_the_key(self, redis_url, redis_server):
        """stdout is the key and a newline; the details and a warning go to stderr."""
        done = bklit("token", "create", "--project", "p1", "--redis", redis_url)
        assert done.returncode == 0, done.stderr
        assert KEY.fullmatch(done.stdout.rstrip("\n")) and done.stdout.count("\n") == 1
        key = done.stdout.strip()
        [token] = listed(redis_url)
        assert f"created ingest key {token['id']} for p1" in done.stderr
        assert "only this once" in done.stderr
        assert key not in done.stderr
        # stored under its hash only
        assert redis_server.execute("EXISTS", token_key(key_digest(key))) == 1

    def test_json(self, redis_url):
        """--json prints one object: the key and the token's description."""
        done = bklit("token", "create", "--project", "p1", "--name", "blog", "--json", "--redis", redis_url)
        assert done.returncode == 0, done.stderr
        created = json.loads(done.stdout)
        assert KEY.fullmatch(created.pop("key"))
        assert created.pop("created_at") == pytest.approx(time.time(), abs=60)
        assert created == {"id": created["id"], "name": "blog", "projects": ["p1"], "scope": "ingest",
                           "domains": [], "expires_at": None, "revoked": False}
        assert re.fullmatch(r"[0-9a-f]{12}", created["id"])

    def test_scope_domains_expiry_and_projects(self, redis_url):
        """--scope, --domains (lowered), --expires-days and several projects are stored."""
        create(redis_url, "--project", "p1,p2", "--project", "p3", "--scope", "read",
               "--domains", "a.com, *.B.com", "--expires-days", "30")
        [token] = listed(redis_url)
        assert token["projects"] == ["p1", "p2", "p3"]
        assert token["scope"] == "read"
        assert token["domains"] == ["a.com", "*.b.com"]
        assert token["expires_at"] == pytest.approx(time.time() + 30 * 86400, abs=60)

    def test_each_key_is_new(self, redis_url):
        """Two creates give two different keys and two tokens."""
        assert create(redis_url, "--project", "p1") != create(redis_url, "--project", "p1")
        assert len(listed(redis_url)) == 2

    @pytest.mark.parametrize("args,message", [
        (["--project", "p 1"], "--project: invalid project id 'p 1'"),
        (["--project", "p1,bad/id"], "--project: invalid project id 'bad/id'"),
        (["--project", ","], "--project: invalid project id"),
        (["--project", "x" * 65], "--project: invalid project id"),
        (["--project", "p1", "--domains", "a.com,https://b.com"], "--domains: 'https://b.com' is not a host name"),
        (["--project", "p1", "--domains", "a.com:8080"], "--domains: 'a.com:8080'"),
        (["--project", "p1", "--expires-days", "0"], "--expires-days: must be more than 0"),
        (["--project", "p1", "--expires-days", "-3"], "--expires-days: must be more than 0"),
        (["--project", "p1", "--expires-days", "nan"], "--expires-days: must be more than 0"),
        (["--project", "p1", "--expires-days", "inf"], "--expires-days: must be more than 0"),
    ])
    def test_bad_arguments_exit_2(self, redis_url, args, message):
        """A bad value exits 2 with a message naming the option, and stores nothing."""
        done = bklit("token", "create", "--redis", redis_url, *args)
        assert done.returncode == 2
        assert message in done.stderr
        assert done.stdout == "" and "Traceback" not in done.stderr
        assert listed(redis_url) == []

    @pytest.mark.parametrize("args,message", [
        ([], "--project"),
        (["--project", "p1", "--scope", "write"], "--scope"),
        (["--project", "p1", "--expires-days", "soon"], "--expires-days"),
    ])
    def test_unparseable_arguments_exit_2(self, redis_url, args, message):
        """Missing or unparseable options are argparse errors: exit 2 naming the option."""
        done = bklit("token", "create", "--redis", redis_url, *args)
        assert done.returncode == 2
        assert message in done.stderr and done.stdout == ""


class TestTokenList:
    """``bklit token list``."""

    def test_text_shows_state_never_the_key(self, redis_url):
        """One row per token with id, scope, state, expiry, projects and name; no key."""
        active = create(redis_url, "--project", "p1", "--name", "site")
        revoked = create(redis_url, "--project", "p2", "--scope", "read")
        expiring = create(redis_url, "--project", "p3", "--expires-days", "0.00001")  # under a second
        assert bklit("token", "revoke", revoked, "--redis", redis_url).returncode == 0
        time.sleep(1.0)
        done = bklit("token", "list", "--redis", redis_url)
        assert done.returncode == 0, done.stderr
        header, *rows = done.stdout.splitlines()
        assert header.split() == ["ID", "SCOPE", "STATE", "EXPIRES", "PROJECTS", "NAME"]
        assert [row.split()[1:5] for row in rows] == [
            ["ingest", "active", "never", "p1"],
            ["read", "revoked", "never", "p2"],
            ["ingest", "expired", time.strftime("%Y-%m-%d", time.gmtime()), "p3"],
        ]
        assert rows[0].split()[-1] == "site"
        for key in (active, revoked, expiring):
            assert key not in done.stdout + done.stderr
            assert key_digest(key) not in done.stdout
            assert key_digest(key)[:12] in done.stdout

    def test_json(self, redis_url):
        """--json lists descriptions, oldest first, with revoked state and no key."""
        first = create(redis_url, "--project", "p1")
        second = create(redis_url, "--project", "p2")
        bklit("token", "revoke", second, "--redis", redis_url)
        done = bklit("token", "list", "--json", "--redis", redis_url)
        tokens = json.loads(done.stdout)
        assert [(t["id"], t["projects"], t["revoked"]) for t in tokens] == [
            (key_digest(first)[:12], ["p1"], False), (key_digest(second)[:12], ["p2"], True)]
        assert first not in done.stdout and second not in done.stdout

    def test_empty(self, redis_url):
        """No tokens: the header alone, or an empty JSON list."""
        assert bklit("token", "list", "--redis", redis_url).stdout.splitlines()[0].startswith("ID")
        assert listed(redis_url) == []


class TestTokenRevoke:
    """``bklit token revoke``."""

    def test_by_id(self, redis_url):
        """The id from the listing revokes the token; the others stay active."""
        create(redis_url, "--project", "p1")
        create(redis_url, "--project", "p2")
        first, second = listed(redis_url)
        done = bklit("token", "revoke", first["id"], "--redis", redis_url)
        assert done.returncode == 0, done.stderr
        assert f"revoked {first['id']}" in done.stderr and done.stdout == ""
        assert [t["revoked"] for t in listed(redis_url)] == [True, False]

    def test_by_id_prefix_and_json(self, redis_url):
        """Six hex digits of the id are enough; --json prints the id revoked."""
        create(redis_url, "--project", "p1")
        [token] = listed(redis_url)
        done = bklit("token", "revoke", token["id"][:6], "--json", "--redis", redis_url)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {"revoked": token["id"]}

    def test_by_key(self, redis_url):
        """The key itself revokes its token, and is not echoed."""
        key = create(redis_url, "--project", "p1")
        done = bklit("token", "revoke", key, "--redis", redis_url)
        assert done.returncode == 0, done.stderr
        assert key not in done.stdout + done.stderr
        assert [t["revoked"] for t in listed(redis_url)] == [True]

    @pytest.mark.parametrize("what", ["0123456789ab", "bk_" + "x" * 40, "abc"])
    def test_unknown_exits_1(self, redis_url, what):
        """An id, key or too short prefix that matches nothing exits 1 and changes nothing."""
        create(redis_url, "--project", "p1")
        done = bklit("token", "revoke", what, "--redis", redis_url)
        assert done.returncode == 1
        assert "no token matches" in done.stderr
        assert not what.startswith("bk_") or what not in done.stderr
        assert [t["revoked"] for t in listed(redis_url)] == [False]


class TestSettings:
    """Where the command finds Redis, and what it does when it cannot."""

    @pytest.mark.parametrize("command", [
        ["token", "create", "--project", "p1"], ["token", "list"], ["token", "revoke", "0123456789ab"]])
    def test_redis_down_exits_1_at_once(self, command):
        """Nothing listens on the Redis port: exit 1 quickly with "cannot reach Redis"."""
        port = free_port()
        started = time.monotonic()
        done = bklit(*command, "--redis", f"redis://127.0.0.1:{port}/0", timeout=20)
        assert done.returncode == 1
        assert f"cannot reach Redis at 127.0.0.1:{port}" in done.stderr
        assert done.stdout == "" and "Traceback" not in done.stderr
        assert time.monotonic() - started < 10

    def test_bad_redis_url_exits_2(self):
        """A malformed --redis is a configuration error naming ``redis``."""
        done = bklit("token", "list", "--redis", "http://127.0.0.1:6379")
        assert done.returncode == 2
        assert "bklit: config error: redis: must start with redis://" in done.stderr
        assert done.stdout == ""

    def test_bad_environment_exits_2(self):
        """Bad BKLIT_* settings are reported each with its key, all at once."""
        done = bklit("token", "list", env={"BKLIT_REDIS": "redis://h:port/0", "BKLIT_REDIS_TIMOUT": "1"})
        assert done.returncode == 2
        lines = done.stderr.splitlines()
        assert any(line.startswith("bklit: config error: redis: ") and "BKLIT_REDIS" in line for line in lines)
        assert "bklit: config error: BKLIT_REDIS_TIMOUT: unknown setting; did you mean BKLIT_REDIS_TIMEOUT?" in lines

    def test_settings_from_ini_file(self, tmp_path, redis_url):
        """--config reads the ini file, and BKLIT_CONFIG does the same."""
        ini = tmp_path / "bklit.ini"
        ini.write_text(f"[bklit]\nredis = {redis_url}\n")
        key = create(redis_url, "--project", "p1")
        for args, env in [(["--config", str(ini)], None), ([], {"BKLIT_CONFIG": str(ini)})]:
            done = bklit("token", "list", "--json", *args, env=env)
            assert done.returncode == 0, done.stderr
            assert [t["id"] for t in json.loads(done.stdout)] == [key_digest(key)[:12]]

    def test_missing_ini_file_exits_2(self, tmp_path):
        """An ini file that is not there is a configuration error on ``config``."""
        done = bklit("token", "list", "--config", str(tmp_path / "missing.ini"))
        assert done.returncode == 2
        assert "bklit: config error: config: cannot read" in done.stderr

    def test_no_command_exits_2(self):
        """Without a command the usage is shown and the exit code is 2."""
        done = bklit()
        assert done.returncode == 2
        assert "usage: bklit" in done.stderr


class TestSchemaMigrate:
    """``bklit schema migrate``."""

    def test_creates_tables_then_is_up_to_date(self, clickhouse_server, clickhouse_db, clickhouse_url):
        """The first run creates the tables; the second changes nothing and says so."""
        done = bklit("schema", "migrate", "--clickhouse", clickhouse_url)
        assert done.returncode == 0, done.stderr
        assert f"{clickhouse_db}: applied migrations 1" in done.stderr
        assert set(TABLES) <= tables(clickhouse_server, clickhouse_db)
        clickhouse_server.query(f"INSERT INTO {clickhouse_db}.page_view_event (id) VALUES ('kept')")

        again = bklit("schema", "migrate", "--clickhouse", clickhouse_url)
        assert again.returncode == 0, again.stderr
        assert f"{clickhouse_db}: schema is up to date" in again.stderr
        assert clickhouse_server.query(f"SELECT id FROM {clickhouse_db}.page_view_event").split() == ["kept"]

    def test_json_and_new_database(self, clickhouse_server):
        """--json reports what was applied; a database that does not exist yet is created."""
        database = f"bklit_cli_{os.getpid()}"
        url = clickhouse_server.url_for(database)
        try:
            first = bklit("schema", "migrate", "--json", "--clickhouse", url)
            assert first.returncode == 0, first.stderr
            assert json.loads(first.stdout) == {"database": database, "applied": [v for v, _ in MIGRATIONS]}
            assert set(TABLES) <= tables(clickhouse_server, database)
            second = bklit("schema", "migrate", "--json", "--clickhouse", url)
            assert json.loads(second.stdout) == {"database": database, "applied": []}
        finally:
            clickhouse_server.query(f"DROP DATABASE IF EXISTS {database}")

    def test_needs_no_redis(self, clickhouse_url):
        """Migrating works with Redis unreachable: it is not used."""
        done = bklit("schema", "migrate", "--clickhouse", clickhouse_url,
                     "--redis", f"redis://127.0.0.1:{free_port()}/0")
        assert done.returncode == 0, done.stderr

    def test_clickhouse_unreachable_exits_1(self):
        """Nothing listens on the ClickHouse port: exit 1 with one line, no traceback."""
        port = free_port()
        done = bklit("schema", "migrate", "--clickhouse", f"clickhouse://default:@127.0.0.1:{port}/bklit")
        assert done.returncode == 1
        assert done.stderr.startswith("bklit: migration failed: ")
        assert "Connection refused" in done.stderr
        assert len(done.stderr.splitlines()) == 1 and "Traceback" not in done.stderr

    def test_bad_clickhouse_url_exits_2(self):
        """A malformed --clickhouse is a configuration error naming ``clickhouse``."""
        done = bklit("schema", "migrate", "--clickhouse", "clickhouse://127.0.0.1/bad-name")
        assert done.returncode == 2
        assert "bklit: config error: clickhouse: " in done.stderr


def test_revoke_reads_the_key_from_standard_input(redis_url, redis_server):
    """``bklit token revoke -`` takes the key from standard input, so it is not in argv; empty input is a
    usage error."""
    key = create(redis_url, "--project", "p1")
    done = bklit("token", "revoke", "-", "--redis", redis_url, stdin=key + "\n")
    assert done.returncode == 0, done.stderr
    assert redis_server.execute("HGET", token_key(key_digest(key)), "revoked") == b"1"
    empty = bklit("token", "revoke", "-", "--redis", redis_url, stdin="")
    assert empty.returncode == 2 and "expected the key on standard input" in empty.stderr


class TestConfigCheck:
    """``bklit config check``: the daemon's settings checked as twistd bklit reads them."""

    def test_prints_the_settings_in_effect_with_passwords_hidden(self, tmp_path):
        """Exit 0; stdout is an ini of every setting, each from its layer, no password in it."""
        ini = tmp_path / "bklit.ini"
        ini.write_text("[bklit]\nbatch_size = 100\nrole = writer\n")
        done = bklit("config", "check", "--config", str(ini), "--role", "ingest",
                     env={"BKLIT_REDIS": "redis://:s3cret@db.example:6380/1", "BKLIT_FLUSH_INTERVAL": "0.5"})
        assert done.returncode == 0, done.stderr
        assert "s3cret" not in done.stdout + done.stderr
        lines = done.stdout.splitlines()
        assert lines[0] == "[bklit]"
        settings = dict(line.split(" = ", 1) if " = " in line else (line.rstrip(" ="), "") for line in lines[1:])
        from bklit.config import KEYS

        assert set(settings) == set(KEYS)
        assert (settings["batch_size"], settings["role"], settings["flush_interval"]) == ("100", "ingest", "0.5")
        assert settings["redis"] == "redis://:***@db.example:6380/1"
        assert settings["listen"] == r"tcp6:8080:interface=\:\:"

    def test_the_installed_ini_is_good(self):
        """etc/bklit.ini as shipped passes."""
        done = bklit("config", "check", "--config", os.path.join(os.path.dirname(__file__), "..", "etc", "bklit.ini"))
        assert done.returncode == 0, done.stderr

    @pytest.mark.parametrize("args,env,key", [
        (["--config", "missing.ini"], {}, "config"),
        ([], {"BKLIT_BATCH_SIZE": "lots"}, "batch_size"),
        ([], {"BKLIT_BATCHSIZE": "10"}, "BKLIT_BATCHSIZE"),
        (["--listen", "tcp:eighty"], {}, "listen"),
        ([], {"BKLIT_STATUS_LISTEN": "unix:/run/bklit-%i.sock"}, "status_listen"),
        ([], {"BKLIT_TLS_CERT": "/nonexistent/fullchain.pem", "BKLIT_TLS_KEY": "/nonexistent/privkey.pem"},
         "tls_cert"),
        ([], {"BKLIT_GEOIP_DB": "/nonexistent/city.mmdb"}, "geoip_db"),
    ])
    def test_a_bad_setting_exits_1_naming_it(self, tmp_path, args, env, key):
        """Exit 1, the error on stderr naming its key, nothing on stdout, no traceback."""
        done = bklit("config", "check", *args, env=env, cwd=tmp_path)
        assert done.returncode == 1, done
        assert done.stdout == ""
        [line] = done.stderr.splitlines()
        assert line.startswith(f"bklit: config error: {key}: "), line

    def test_a_variable_that_is_no_setting_is_a_warning(self):
        """Exit 0 with one warning line naming it."""
        done = bklit("config", "check", env={"BKLIT_DEPLOY_COLOUR": "blue"})
        assert done.returncode == 0
        assert done.stderr.splitlines() == ["bklit: warning: BKLIT_DEPLOY_COLOUR is not a bklit setting; ignored"]

    def test_usage_error_exits_2(self):
        done = bklit("config", "check", "--bogus")
        assert done.returncode == 2 and "unrecognized arguments: --bogus" in done.stderr
