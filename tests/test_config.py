"""Tests for bklit.config: layering, validation, error reporting, and etc/bklit.ini."""

import dataclasses
import re
from pathlib import Path

import pytest

from bklit.config import KEYS, Config, ConfigError, load_config, read_ini, unknown_variables
from bklit.addresses import parse_redis_url, RedisAddress

SAMPLE_INI = Path(__file__).resolve().parent.parent / "etc" / "bklit.ini"


def write_ini(tmp_path, text, name="bklit.ini"):
    """Write ``text`` to an ini file under ``tmp_path`` and return its path."""
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def errors_of(**kwargs):
    """The ``(key, message)`` list of the ConfigError that load_config raises."""
    kwargs.setdefault("environ", {})
    with pytest.raises(ConfigError) as caught:
        load_config(**kwargs)
    return caught.value.errors


def keys_of(errors):
    """The keys named by a list of errors, in order."""
    return [key for key, _ in errors]


DEFAULT_LINE = re.compile(r"#([a-z_]+) =(?: (.*))?$")


def commented_defaults():
    """``{key: value}`` of the sample's ``#key = value`` lines."""
    found = {}
    for line in SAMPLE_INI.read_text().splitlines():
        match = DEFAULT_LINE.match(line)
        if match:
            assert match[1] not in found, f"{match[1]} listed twice in etc/bklit.ini"
            found[match[1]] = match[2] or ""
    return found


class TestSampleIni:
    """etc/bklit.ini documents exactly the keys the daemon reads, each default commented out."""

    def test_sets_nothing(self):
        """Parsed, its [bklit] section is empty: every default is commented out."""
        assert read_ini(str(SAMPLE_INI)) == {}

    def test_names_exactly_the_keys(self):
        """Every key of KEYS is listed (``#key = default``), and nothing else is."""
        names = set(commented_defaults())
        assert sorted(set(KEYS) - names) == [], "keys missing from etc/bklit.ini"
        assert sorted(names - set(KEYS)) == [], "unknown keys in etc/bklit.ini"

    def test_values_are_the_defaults(self):
        """The commented values are the built-in defaults, so uncommenting one changes nothing."""
        assert commented_defaults() == {name: key.default for name, key in KEYS.items()}

    def test_help_line_above_every_key(self):
        """Each key is preceded by a comment block holding its help line."""
        lines = SAMPLE_INI.read_text().splitlines()
        for name, key in KEYS.items():
            [index] = [i for i, line in enumerate(lines) if re.match(rf"#{name} =", line)]
            comments = []
            for line in reversed(lines[:index]):
                if not line.startswith("#"):
                    break
                comments.append(line[1:].strip())
            assert key.help in comments, f"{name}: help line missing or changed in etc/bklit.ini"

    def test_parsing_it_gives_the_built_in_defaults(self):
        """The sample loads as it is and gives the same Config as no file at all, and that
        is the defaults of KEYS."""
        config = load_config(str(SAMPLE_INI), {})
        assert config == load_config(None, {})
        assert config == Config(**{name: key.parse(key.default) for name, key in KEYS.items()})

    def test_each_default_uncommented_still_gives_the_defaults(self, tmp_path):
        """With every ``#`` of a default removed the file still changes nothing."""
        text = re.sub(r"^#([a-z_]+ =)", r"\1", SAMPLE_INI.read_text(), flags=re.M)
        ini = write_ini(tmp_path, text)
        assert set(read_ini(ini)) == set(KEYS)
        assert load_config(ini, {}) == load_config(None, {})


class TestLayering:
    """Defaults < ini < environment < flags."""

    def test_defaults(self):
        """With nothing given, every key has its documented default."""
        config = load_config(None, {})
        assert config.listen == r"tcp6:8080:interface=\:\:"
        assert config.role == "all"
        assert config.auto_migrate is True
        assert config.batch_size == 5000
        assert config.flush_interval == 1.0
        assert config.trusted_proxies == ()
        assert config.redis_address == RedisAddress("127.0.0.1", 6379, 0, None, False)
        assert config.clickhouse_database == "bklit"

    def test_ini_overrides_defaults(self, tmp_path):
        """A value in [bklit] replaces the default; keys it omits keep theirs."""
        ini = write_ini(tmp_path, "[bklit]\nbatch_size = 100\nrole = writer\n")
        config = load_config(ini, {})
        assert (config.batch_size, config.role, config.listen) == (100, "writer", r"tcp6:8080:interface=\:\:")
        assert not config.runs_ingest and config.runs_writer

    def test_env_overrides_ini(self, tmp_path):
        """BKLIT_<KEY> beats the ini file."""
        ini = write_ini(tmp_path, "[bklit]\nbatch_size = 100\nflush_interval = 3\n")
        config = load_config(ini, {"BKLIT_BATCH_SIZE": "200", "PATH": "/bin"})
        assert (config.batch_size, config.flush_interval) == (200, 3.0)

    def test_flags_override_env(self, tmp_path):
        """A flag beats the environment and the ini; a flag of None is not given."""
        ini = write_ini(tmp_path, "[bklit]\nrole = writer\nlisten = tcp:1\n")
        config = load_config(ini, {"BKLIT_ROLE": "all", "BKLIT_LISTEN": "tcp:2"},
                             {"role": "ingest", "listen": None})
        assert (config.role, config.listen) == ("ingest", "tcp:2")
        assert config.runs_ingest and not config.runs_writer

    def test_parsed_types(self, tmp_path):
        """Values are parsed: bools, ints, seconds and lists, whitespace stripped."""
        ini = write_ini(tmp_path, (
            "[bklit]\nauto_migrate = off\nwriter_threads =  4 \nclaim_idle = 2.5\n"
            "trusted_proxies = 10.0.0.0/8, ::1 ,\n"))
        config = load_config(ini, {"BKLIT_AUTO_MIGRATE": "Yes"})
        assert config.auto_migrate is True
        assert config.writer_threads == 4
        assert config.claim_idle == 2.5
        assert config.trusted_proxies == ("10.0.0.0/8", "::1")

    def test_bklit_config_variable_is_not_a_setting(self):
        """BKLIT_CONFIG names the ini file; it is not refused as unknown."""
        assert load_config(None, {"BKLIT_CONFIG": "/nowhere.ini"}) == load_config(None, {})

    def test_case_of_ini_keys_ignored(self, tmp_path):
        """ini keys are case-insensitive, as configparser reads them."""
        ini = write_ini(tmp_path, "[bklit]\nBatch_Size = 7\n")
        assert load_config(ini, {}).batch_size == 7


class TestErrors:
    """Every bad value is reported, at once, each naming its key."""

    @pytest.mark.parametrize("key,value,words", [
        ("batch_size", "lots", "whole number"),
        ("batch_size", "0", "between 1 and 1000000"),
        ("writer_threads", "65", "between 1 and 64"),
        ("flush_interval", "soon", "number of seconds"),
        ("flush_interval", "0", "between"),
        ("redis_timeout", "nan", "between"),
        ("auto_migrate", "maybe", "true or false"),
        ("role", "both", "one of all, ingest, writer"),
        ("redis", "http://127.0.0.1:6379", "redis://"),
        ("redis", "redis://127.0.0.1:port/0", "invalid port"),
        ("redis", "redis://127.0.0.1:6379/zero", "database must be a number"),
        ("clickhouse", "mysql://127.0.0.1/bklit", "clickhouse://"),
        ("clickhouse", "clickhouse:///bklit", "needs a host"),
        ("clickhouse", "clickhouse://127.0.0.1:nine/bklit", "invalid port"),
        ("clickhouse", "clickhouse://127.0.0.1/bk-lit", "not a plain identifier"),
        ("trusted_proxies", "10.0.0.1, proxy.local", "'proxy.local'"),
        ("spool_max_bytes", "lots", "size in bytes"),
        ("spool_max_bytes", "1K", "between 65536 and"),
        ("spool_max_bytes", "1X", "size in bytes"),
    ])
    def test_bad_value_names_key_and_source(self, tmp_path, key, value, words):
        """A bad value from any layer is one error naming the key and saying why."""
        ini = write_ini(tmp_path, f"[bklit]\n{key} = {value}\n")
        for kwargs, source in [
            ({"ini_path": ini}, ini),
            ({"environ": {f"BKLIT_{key.upper()}": value}}, f"BKLIT_{key.upper()}"),
            ({"flags": {key: value}}, None),
        ]:
            [(named, message)] = errors_of(**kwargs)
            assert named == key
            assert words in message
            if source:
                assert message.endswith(f"(from {source})")

    def test_all_errors_at_once(self, tmp_path):
        """Bad ini values, unknown keys, unknown env vars and bad flags come in one error."""
        ini = write_ini(tmp_path, "[bklit]\nbatch_size = lots\nbatchsize = 5\nauto_migrate = maybe\n")
        errors = errors_of(ini_path=ini, environ={"BKLIT_FLUSH_INTERVAL": "-1", "BKLIT_BATCH_SISE": "1"},
                           flags={"role": "both", "redis": "redis://[::1"})
        assert sorted(keys_of(errors)) == sorted([
            "batch_size", "batchsize", "auto_migrate", "flush_interval", "BKLIT_BATCH_SISE", "role", "redis"])

    def test_str_has_one_line_per_error_starting_with_the_key(self):
        """str(ConfigError) is one ``key: message`` line per error."""
        with pytest.raises(ConfigError) as caught:
            load_config(None, {"BKLIT_BATCH_SIZE": "lots"}, {"role": "both"})
        lines = str(caught.value).splitlines()
        assert len(lines) == 2
        assert sorted(line.split(":")[0] for line in lines) == ["batch_size", "role"]

    def test_unknown_ini_key(self, tmp_path):
        """A key the daemon does not know is refused, naming it and the file."""
        ini = write_ini(tmp_path, "[bklit]\nbatch_sise = 10\n")
        [(key, message)] = errors_of(ini_path=ini)
        assert key == "batch_sise"
        assert "unknown key" in message and ini in message

    @pytest.mark.parametrize("name,meant", [
        ("BKLIT_BATCHSIZE", "BKLIT_BATCH_SIZE"),
        ("BKLIT_FLUSH_INTERVALL", "BKLIT_FLUSH_INTERVAL"),
        ("BKLIT_REDDIS", "BKLIT_REDIS"),
        ("BKLIT_TLS_CRET", "BKLIT_TLS_CERT"),
        ("BKLIT_LOGLEVEL", "BKLIT_LOG_LEVEL"),
    ])
    def test_misspelt_env_variable(self, name, meant):
        """A BKLIT_ variable that looks like a misspelt setting is refused, naming the setting."""
        [(key, message)] = errors_of(environ={name: "10", "HOME": "/root"})
        assert key == name and message == f"unknown setting; did you mean {meant}?"

    def test_other_env_variables_are_only_warned_about(self):
        """A BKLIT_ variable like no setting is ignored by load_config and listed by
        unknown_variables, once; the project's other variables are neither."""
        environ = {"BKLIT_NOPE": "1", "BKLIT_DEPLOY_COLOUR": "blue", "BKLIT_CONFIG": "/nowhere.ini",
                   "BKLIT_PROBE_KEY": "k", "BKLIT_TLS_DIR": "/etc/bklit/tls", "BKLIT_GROUP": "bklit",
                   "BKLIT_RELOAD_COMMAND": "true", "BKLIT_BATCH_SIZE": "7", "BKLIT_BATCHSIZE_": "8"}
        with pytest.raises(ConfigError):  # the last one is misspelt
            load_config(None, environ)
        del environ["BKLIT_BATCHSIZE_"]
        assert load_config(None, environ).batch_size == 7
        assert unknown_variables(environ) == ["BKLIT_DEPLOY_COLOUR", "BKLIT_NOPE"]

    def test_status_listen_with_instance(self):
        """``%i`` in status_listen is the instance; without one it is an error on status_listen."""
        config = load_config(None, {"BKLIT_STATUS_LISTEN": "unix:/run/bklit-ingest-%i/status.sock",
                                    "BKLIT_INSTANCE": "3"})
        assert config.status_endpoint == "unix:/run/bklit-ingest-3/status.sock"
        assert load_config(None, {}).status_endpoint == ""
        [(key, message)] = errors_of(environ={"BKLIT_STATUS_LISTEN": "tcp:91%i"})
        assert key == "status_listen" and "instance" in message
        [(key, _)] = errors_of(environ={"BKLIT_INSTANCE": "../etc"})
        assert key == "instance"

    def test_as_text_hides_passwords_and_reads_back(self, tmp_path):
        """as_text() is an ini a daemon could read: the same Config, passwords aside."""
        config = load_config(None, {"BKLIT_REDIS": "redis://:s3cret@db:6379/2", "BKLIT_COMPRESSION": "yes",
                                    "BKLIT_DASHBOARD_ORIGINS": "p1=https://a.example", "BKLIT_RATE_LIMIT": "2.5"})
        text = config.as_text()
        assert text["redis"] == "redis://:***@db:6379/2" and "s3cret" not in repr(text)
        ini = write_ini(tmp_path, "[bklit]\n" + "".join(f"{k} = {v}\n" for k, v in text.items()))
        assert load_config(ini, {}) == config.replace(redis="redis://:***@db:6379/2")

    def test_missing_ini_file(self, tmp_path):
        """A file that cannot be read is an error on ``config`` naming the path."""
        path = str(tmp_path / "missing.ini")
        [(key, message)] = errors_of(ini_path=path)
        assert key == "config"
        assert path in message and "cannot read" in message

    def test_missing_ini_file_reported_with_other_errors(self, tmp_path):
        """An unreadable file does not hide the bad values of the other layers."""
        errors = errors_of(ini_path=str(tmp_path / "missing.ini"), environ={"BKLIT_BATCH_SIZE": "lots"},
                           flags={"role": "both"})
        assert sorted(keys_of(errors)) == ["batch_size", "config", "role"]

    def test_ini_without_section(self, tmp_path):
        """An ini file without [bklit] is an error on ``config``."""
        ini = write_ini(tmp_path, "[other]\nbatch_size = 10\n")
        [(key, message)] = errors_of(ini_path=ini)
        assert key == "config" and "no [bklit] section" in message

    def test_ini_without_any_section(self, tmp_path):
        """Bare ``key = value`` lines are not an ini file bklit reads."""
        ini = write_ini(tmp_path, "batch_size = 10\n")
        [(key, message)] = errors_of(ini_path=ini)
        assert key == "config" and "not a valid ini file" in message

    def test_ini_with_duplicate_key(self, tmp_path):
        """A key given twice is refused rather than one value silently winning."""
        ini = write_ini(tmp_path, "[bklit]\nbatch_size = 10\nbatch_size = 20\n")
        [(key, message)] = errors_of(ini_path=ini)
        assert key == "config" and "not a valid ini file" in message

    def test_ini_defaults_section_is_not_shared(self, tmp_path):
        """A [DEFAULT] section has no special meaning: its keys do not leak into [bklit]."""
        ini = write_ini(tmp_path, "[DEFAULT]\nbatch_size = lots\n[bklit]\nrole = writer\n")
        assert load_config(ini, {}).batch_size == 5000


@pytest.mark.parametrize("value,size", [
    ("1G", 1 << 30), ("64K", 65536), ("64 KiB", 65536), ("2m", 2 << 20), ("1073741824", 1 << 30), ("1 TB", 1 << 40),
])
def test_sizes_take_binary_suffixes(value, size):
    """spool_max_bytes reads plain bytes or K, M, G, T (powers of 1024), with or without B/iB."""
    assert load_config(None, {"BKLIT_SPOOL_MAX_BYTES": value}).spool_max_bytes == size


class TestRedisAddress:
    """parse_redis_url and RedisAddress."""

    @pytest.mark.parametrize("url,address", [
        ("redis://127.0.0.1:6379/0", RedisAddress("127.0.0.1", 6379, 0, None, False)),
        ("redis://cache.internal", RedisAddress("cache.internal", 6379, 0, None, False)),
        ("redis://cache.internal:6380/3", RedisAddress("cache.internal", 6380, 3, None, False)),
        ("redis://:s3cret@cache:6379/1", RedisAddress("cache", 6379, 1, "s3cret", False)),
        ("redis://user:p%40ss%2Fword@cache/2", RedisAddress("cache", 6379, 2, "p@ss/word", False, "user")),
        ("redis://bklit:pw@cache:6379/0", RedisAddress("cache", 6379, 0, "pw", False, "bklit")),
        ("rediss://:s3cret@cache.example.com:6380/0",
         RedisAddress("cache.example.com", 6380, 0, "s3cret", True)),
        ("redis://[::1]:6379/0", RedisAddress("::1", 6379, 0, None, False)),
    ])
    def test_parse(self, url, address):
        """Host, port, database, password (unquoted) and TLS come from the URL."""
        assert parse_redis_url(url) == address

    @pytest.mark.parametrize("url,address", [
        ("redis+sentinel://10.0.0.1:26379,10.0.0.2:26380/bklit/3",
         RedisAddress("10.0.0.1", 26379, 3, None, False, None, (("10.0.0.1", 26379), ("10.0.0.2", 26380)), "bklit")),
        ("redis+sentinel://:s3cret@s1/mymaster",
         RedisAddress("s1", 26379, 0, "s3cret", False, None, (("s1", 26379),), "mymaster")),
        ("redis+sentinel://app:p%40ss@[::1]:5000,s2/bklit/0",
         RedisAddress("::1", 5000, 0, "p@ss", False, "app", (("::1", 5000), ("s2", 26379)), "bklit")),
    ])
    def test_parse_sentinel(self, url, address):
        """A Sentinel URL lists the Sentinels (port 26379 by default), the service and the database."""
        assert parse_redis_url(url) == address

    @pytest.mark.parametrize("url,message", [
        ("redis+sentinel://s1:26379", "names no service"),
        ("redis+sentinel://s1:26379/bklit/x", "database must be a number"),
        ("redis+sentinel://s1:99999/bklit", "invalid port"),
        ("redis+sentinel://s1:26379,/bklit", "is not a Sentinel's host:port"),
        ("redis+sentinel://s1/bad name", "is not a Sentinel master name"),
        ("rediss+sentinel://s1/bklit", "must start with"),
    ])
    def test_bad_sentinel_url(self, url, message):
        """Each mistake in a Sentinel URL is one clear error naming the key."""
        with pytest.raises(ConfigError) as raised:
            load_config(None, {"BKLIT_REDIS": url})
        [(key, text)] = raised.value.errors
        assert key == "redis" and message in text

    def test_sentinel_repr_hides_password(self):
        """A Sentinel address shows its Sentinels and service, never the password."""
        address = parse_redis_url("redis+sentinel://u:s3cret@a:1,[::1]:2/bklit/4")
        assert repr(address) == "RedisAddress(redis+sentinel://a:1,[::1]:2/bklit/4)"
        config = load_config(None, {"BKLIT_REDIS": "redis+sentinel://u:s3cret@a:1,b:2/bklit/4"})
        assert "s3cret" not in repr(config) and "a:1,b:2" in repr(config)

    def test_replica_settings(self):
        """redis_min_replicas and redis_replica_timeout; the timeout must stay below redis_timeout."""
        config = load_config(None, {"BKLIT_REDIS_MIN_REPLICAS": "1", "BKLIT_REDIS_REPLICA_TIMEOUT": "0.5"})
        assert (config.redis_min_replicas, config.redis_replica_timeout) == (1, 0.5)
        assert (load_config(None, {}).redis_min_replicas, load_config(None, {}).redis_replica_timeout) == (0, 1.0)
        with pytest.raises(ConfigError) as raised:
            load_config(None, {"BKLIT_REDIS_MIN_REPLICAS": "1", "BKLIT_REDIS_TIMEOUT": "1"})
        assert keys_of(raised.value.errors) == ["redis_replica_timeout"]
        with pytest.raises(ConfigError) as raised:
            load_config(None, {"BKLIT_REDIS_MIN_REPLICAS": "-1"})
        assert keys_of(raised.value.errors) == ["redis_min_replicas"]

    def test_repr_hides_password(self):
        """The password never appears in repr() or str(), so logging an address is safe."""
        address = parse_redis_url("rediss://:s3cret@cache:6380/1")
        assert "s3cret" not in repr(address) and "s3cret" not in str(address)
        assert repr(address) == "RedisAddress(rediss://cache:6380/1)"

    def test_config_repr_hides_passwords(self):
        """Nor do the Redis and ClickHouse passwords appear in repr(Config)."""
        config = load_config(None, {"BKLIT_REDIS": "redis://:s3cret@cache:6379/0",
                                    "BKLIT_CLICKHOUSE": "clickhouse://bklit:t0psecret@ch:9000/bklit"}, {})
        text = repr(config)
        assert "s3cret" not in text and "t0psecret" not in text
        assert "cache:6379" in text and "ch:9000" in text
        assert config.redis_address.password == "s3cret"

    def test_config_redis_address(self):
        """Config.redis_address parses the configured URL."""
        config = load_config(None, {"BKLIT_REDIS": "redis://:pw@h:1234/5"})
        assert config.redis_address == RedisAddress("h", 1234, 5, "pw", False)


class TestFrozen:
    """The Config is one frozen object."""

    def test_cannot_be_mutated(self):
        """Assigning or deleting an attribute raises."""
        config = load_config(None, {})
        with pytest.raises(dataclasses.FrozenInstanceError):
            config.batch_size = 1
        with pytest.raises(dataclasses.FrozenInstanceError):
            del config.role
        assert config.batch_size == 5000

    def test_replace_makes_a_copy(self):
        """replace() returns a changed copy and leaves the original alone."""
        config = load_config(None, {})
        other = config.replace(batch_size=10)
        assert (config.batch_size, other.batch_size) == (5000, 10)
        assert isinstance(other, Config)

    def test_redis_address_frozen(self):
        """A RedisAddress cannot be changed either."""
        address = parse_redis_url("redis://h:1/0")
        with pytest.raises(dataclasses.FrozenInstanceError):
            address.port = 2

    def test_every_key_is_a_field(self):
        """KEYS and the Config fields are the same names."""
        assert set(KEYS) == {field.name for field in dataclasses.fields(Config)}


@pytest.mark.parametrize("value,error", [
    ("https://app.example.com", "each entry is project=origin"),
    ("p1=null", "is not an origin"),
    ("p1=file://", "is not an origin"),
    ("p:1=https://app.example.com", "each entry is project=origin"),
    ("p1=https://app.example.com/path", "is not an origin"),
])
def test_dashboard_origins_bind_origins_to_projects(value, error):
    """dashboard_origins is project=origin pairs; anything else is a config error naming the key."""
    with pytest.raises(ConfigError, match=f"dashboard_origins: .*{error}"):
        load_config(None, {"BKLIT_DASHBOARD_ORIGINS": value}, {})
    config = load_config(None, {"BKLIT_DASHBOARD_ORIGINS": "p1=https://a.example.com/, p2=http://b.example:8080"}, {})
    assert config.dashboard_origins == (("p1", "https://a.example.com"), ("p2", "http://b.example:8080"))


@pytest.mark.parametrize("flag,url", [("redis", "redis://:hunter2@127.0.0.1:6379/0"),
                                      ("clickhouse", "clickhouse://default:hunter2@127.0.0.1:9000/bklit")])
def test_a_password_on_the_command_line_is_refused_with_a_hint(flag, url):
    """--redis / --clickhouse with a password: a config error pointing to the environment or the ini file,
    never echoing the password; the same URL from the environment is fine."""
    with pytest.raises(ConfigError) as e:
        load_config(None, {}, {flag: url})
    assert f"put the URL in BKLIT_{flag.upper()} or the ini file" in str(e.value)
    assert "hunter2" not in str(e.value)
    assert load_config(None, {f"BKLIT_{flag.upper()}": url}, {})
