"""CPace (`shoal.trust.pake`) against the test vectors of draft-irtf-cfrg-cpace
(appendix "Test vector for CPace using group X25519 and hash SHA-512"), and its abort
on low-order points."""

from __future__ import annotations

import hashlib

import pytest

from shoal.trust import pake
from shoal.trust.pake import KeyShare, PakeError

# The draft's inputs for CPACE-X25519-SHA512.
PRS = b"Password"
CI = bytes.fromhex("0b415f696e69746961746f720b425f726573706f6e646572")
SID = bytes.fromhex("7e4b4791d6a8ef019b936c79fb7f2c57")
YA_SCALAR = bytes.fromhex("21b4f4bd9e64ed355c3eb676a28ebedaf6d8f17bdc365995b319097153044080")
YB_SCALAR = bytes.fromhex("848b0779ff415f0af4ea14df9dd1d3c29ac41d836c7808896c4eba19c51ac40a")


def test_length_prefixes_match_the_draft() -> None:
    assert pake.prepend_len(b"").hex() == "00"
    assert pake.prepend_len(b"1234").hex() == "0431323334"
    assert pake.prepend_len(bytes(range(127)))[:1].hex() == "7f"
    assert pake.prepend_len(bytes(range(128)))[:2].hex() == "8001"
    assert pake.lv_cat(b"1234", b"5", b"", b"678").hex() == "043132333401350003363738"


def test_the_generator_matches_the_draft() -> None:
    string = pake.generator_string(PRS, CI, SID)
    assert len(string) == 170
    assert string.hex().startswith("0843506163653235350850617373776f72646d" + "00" * 109)
    assert string.hex().endswith("180b415f696e69746961746f720b425f726573706f6e646572107e4b4791d6a8ef019b936c79fb7f2c57")  # fmt: skip  # noqa: E501
    assert pake.generator(PRS, CI, SID).hex() == (
        "d04bf6d41f6a289632a2e929fa29bebd51092512a7829fdde7d314b62f05a73f"
    )


def test_shares_keys_and_the_session_key_match_the_draft() -> None:
    a = pake.key_share(PRS, CI, SID, scalar=YA_SCALAR)
    b = pake.key_share(PRS, CI, SID, scalar=YB_SCALAR)
    assert a.public.hex() == "1d13c89278cdadd826f6d8d7f887701430f8380ddc17611cdd6dc989ce0c9f32"
    assert b.public.hex() == "248cccf6d5cdc3646f0ad593f9e6cef4e69d4945f8372e623512ecea32185623"
    isk_a = pake.session_key(a, b.public, SID, initiator=True)
    isk_b = pake.session_key(b, a.public, SID, initiator=False)
    assert isk_a == isk_b
    # The draft's ISK has ADa = "ADa" and ADb = "ADb"; Shoal sends none (it binds the
    # node keys and nonces in the transcript it proves instead). Same K, same layout:
    k = bytes.fromhex("5b067effbdc0b2a0e1d907b21ebb25cfedb96a852179a847c37e43ee71322c6b")
    with_ad = hashlib.sha512(
        pake.lv_cat(b"CPace255_ISK", SID, k)
        + pake.lv_cat(a.public, b"ADa")
        + pake.lv_cat(b.public, b"ADb")
    ).digest()
    assert with_ad.hex() == (
        "6e19b875f7a561d6b3ca3dbb9ef42ac55de3e717881018204b8922b4d5e53bb2"
        "aa82c300bea7b65d2b671da71922ddf6472301b79bc270adfa8bf413285f2263"
    )
    ours = hashlib.sha512(
        pake.lv_cat(b"CPace255_ISK", SID, k)
        + pake.lv_cat(a.public, b"")
        + pake.lv_cat(b.public, b"")
    ).digest()
    assert isk_a == ours


def test_another_password_gives_another_key() -> None:
    a = pake.key_share(PRS, CI, SID)
    b = pake.key_share(b"Passw0rd", CI, SID)
    assert pake.session_key(a, b.public, SID, initiator=True) != pake.session_key(
        b, a.public, SID, initiator=False
    )
    c = pake.key_share(PRS, CI + b"x", SID)  # another channel: another generator
    assert pake.session_key(a, c.public, SID, initiator=True) != pake.session_key(
        c, a.public, SID, initiator=False
    )


# The draft's low-order u-coordinates (u0, u1, u2, u3, u4, u5, u7): each must abort.
LOW_ORDER = [
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0100000000000000000000000000000000000000000000000000000000000000",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
    "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
]


@pytest.mark.parametrize("point", LOW_ORDER)
def test_a_low_order_share_aborts(point: str) -> None:
    ours = pake.key_share(PRS, CI, SID)
    with pytest.raises(PakeError):
        pake.session_key(ours, bytes.fromhex(point), SID, initiator=False)


def test_non_canonical_points_give_the_drafts_results() -> None:
    s = bytes.fromhex("af46e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449aff")
    share = KeyShare(s, b"")
    cases = {  # u6, u8: the top bit set, which X25519 must ignore
        "daffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff": "d8e2c776bbacd510d09fd9278b7edcd25fc5ae9adfba3b6e040e8d3b71b21806",  # noqa: E501
        "dbffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff": "c85c655ebe8be44ba9c0ffde69f2fe10194458d137f09bbff725ce58803cdb38",  # noqa: E501
    }
    for u, q in cases.items():
        assert pake._x25519(share.scalar, bytes.fromhex(u)).hex() == q


def test_the_scalar_is_not_in_the_repr() -> None:
    share = pake.key_share(PRS, CI, SID, scalar=YA_SCALAR)
    assert YA_SCALAR.hex() not in repr(share) and share.public.hex() in repr(share)
