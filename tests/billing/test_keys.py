"""The key format: gph_ + random base62 + checksum; only the sha256 is kept."""

import hashlib

from billing import keys


class TestFormat:
    def test_generated_keys_are_well_formed_and_distinct(self):
        made = [keys.generate() for _ in range(200)]
        assert len({k.secret for k in made}) == 200
        for k in made:
            assert k.secret.startswith("gph_") and len(k.secret) == keys.KEY_LENGTH
            assert keys.well_formed(k.secret)
            assert k.sha256 == hashlib.sha256(k.secret.encode()).hexdigest()
            assert k.prefix == k.secret[:8] and k.last_four == k.secret[-4:]

    def test_at_least_128_random_bits(self):
        assert keys.RANDOM_CHARS * 5.954 >= 128  # log2(62) bits per base62 character

    def test_a_typo_fails_the_checksum(self):
        secret = keys.generate().secret
        i = 10
        typo = secret[:i] + ("a" if secret[i] != "a" else "b") + secret[i + 1 :]
        assert not keys.well_formed(typo)

    def test_garbage_is_not_well_formed(self):
        for bad in ["", "gph_", "sk-123", "gph_" + "!" * 30, keys.generate().secret + "x"]:
            assert not keys.well_formed(bad)

    def test_matches_compares_against_the_stored_hash(self):
        k = keys.generate()
        assert keys.matches(k.secret, k.sha256)
        assert not keys.matches(keys.generate().secret, k.sha256)
