"""PgBouncer-format userlist.txt: quoting, comments, secret kinds, and errors that never leak passwords."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.protocol import UserlistError, load_userlist, make_scram_verifier

VERIFIER = make_scram_verifier("scram-pw")
MD5 = "md5" + "0123456789abcdef" * 2


def write(tmp_path: Path, text: str | bytes) -> str:
    path = tmp_path / "userlist.txt"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return str(path)


def test_valid_userlist(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "; PgBouncer-style comment\n"
        "# another comment\n"
        "\n"
        '"alice" "plain secret"\n'
        '  "bob"\t"' + MD5 + '"   \n'
        '"carol" "' + VERIFIER + '"\n'
        '"d""q" "pa""ss""" extra columns are ignored, like PgBouncer\n'
        '"ünï" ""\n'
        '"e" "#not a comment; inside quotes"\r\n',
    )
    assert load_userlist(path) == {
        "alice": "plain secret",
        "bob": MD5,
        "carol": VERIFIER,
        'd"q': 'pa"ss"',
        "ünï": "",
        "e": "#not a comment; inside quotes",
    }


def test_empty_file(tmp_path: Path) -> None:
    assert load_userlist(write(tmp_path, "")) == {}
    assert load_userlist(write(tmp_path, "# only comments\n;\n\n")) == {}


PASSWORD = "Sup3rS3cret"


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (f'alice "{PASSWORD}"', "expected a double-quoted user name"),
        (f'"alice {PASSWORD}', "unterminated quoted user name"),
        ('"alice"', "expected white space after the quoted user name"),
        ('"alice" ', "expected white space after the quoted user name"),  # lines are stripped
        (f'"alice" {PASSWORD}', "expected a double-quoted password"),
        (f'"alice" "{PASSWORD}', "unterminated quoted password"),
        (f'"alice""{PASSWORD}"', "expected white space after the quoted user name"),
        (f'"alice""{PASSWORD}', "unterminated quoted user name"),
        (
            f'"alice" "{PASSWORD}"x',
            "unexpected character after the closing quote of the password",
        ),
        (f'"alice" "{PASSWORD[:4]}"{PASSWORD[4:]}"', "unexpected character after the closing quote"),
        (f'"" "{PASSWORD}"', "empty user name"),
        (f'"alice" "SCRAM-SHA-256${PASSWORD}"', 'malformed SCRAM-SHA-256 verifier for user "alice"'),
        (
            '"alice" "SCRAM-SHA-256$1000:' + VERIFIER.split(":", 1)[1] + '"',
            'SCRAM-SHA-256 verifier for user "alice" has 1000 iterations',
        ),
    ],
)
def test_malformed_line(tmp_path: Path, line: str, problem: str) -> None:
    path = write(tmp_path, f'# header\n"ok" "fine"\n{line}\n')
    with pytest.raises(UserlistError) as info:
        load_userlist(path)
    message = str(info.value)
    assert message.startswith(f"{path}:3: ")
    assert problem in message
    assert PASSWORD not in message and PASSWORD[4:] not in message
    assert isinstance(info.value, ValueError)


def test_duplicate_user(tmp_path: Path) -> None:
    path = write(tmp_path, '"alice" "one"\n"alice" "two-secret"\n')
    with pytest.raises(UserlistError) as info:
        load_userlist(path)
    assert str(info.value) == f'{path}:2: duplicate entry for user "alice"'


def test_invalid_utf8(tmp_path: Path) -> None:
    path = write(tmp_path, b'"alice" "one"\n"b\xffb" "two"\n')
    with pytest.raises(UserlistError) as info:
        load_userlist(path)
    assert str(info.value) == f"{path}:2: line is not valid UTF-8"


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.txt")
    with pytest.raises(UserlistError) as info:
        load_userlist(path)
    assert str(info.value).startswith(f"{path}: cannot read userlist")


def test_md5_lookalikes_are_plain_text(tmp_path: Path) -> None:
    """Like PostgreSQL: only "md5" + 32 lowercase hex digits is a hash; anything else is a password."""
    upper = "md5" + "0123456789ABCDEF" * 2
    path = write(tmp_path, f'"a" "md5short"\n"b" "{upper}"\n')
    assert load_userlist(path) == {"a": "md5short", "b": upper}
