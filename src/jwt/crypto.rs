//! Signature checks for `jsonwebtoken` on `ring`, the library rustls already links.
//!
//! jsonwebtoken's pure-Rust backend verifies an RS256 signature in about 600 µs (its big
//! integers are generic); ring does it in a few tens. [`install`] registers a
//! [`CryptoProvider`] whose verifiers are ring's and whose signers and JWK helpers stay
//! jsonwebtoken's own (the gateway never signs; the tests do). Keys keep jsonwebtoken's
//! formats: RSA as modulus and exponent or PKCS#1 DER, EC as an uncompressed point, Ed25519
//! as 32 bytes, HMAC as the secret.

use jsonwebtoken::crypto::{rust_crypto, CryptoProvider, JwtVerifier};
use jsonwebtoken::errors::{Error, ErrorKind};
use jsonwebtoken::signature::{self, Verifier};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, DecodingKeyKind};
use ring::{hmac, signature as sig};

/// Makes ring's verifiers the process's default. Idempotent; when something in the process
/// already fixed another provider (only tests could), that one stays, which is still correct.
pub(crate) fn install() {
    static PROVIDER: std::sync::OnceLock<CryptoProvider> = std::sync::OnceLock::new();
    let mut first = false;
    let provider = PROVIDER.get_or_init(|| {
        first = true;
        CryptoProvider {
            verifier_factory: verifier,
            ..rust_crypto::DEFAULT_PROVIDER.clone()
        }
    });
    if first {
        let _ = provider.install_default();
    }
}

fn family(alg: Algorithm) -> AlgorithmFamily {
    match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => AlgorithmFamily::Hmac,
        Algorithm::ES256 | Algorithm::ES384 => AlgorithmFamily::Ec,
        Algorithm::EdDSA => AlgorithmFamily::Ed,
        _ => AlgorithmFamily::Rsa,
    }
}

fn verifier(alg: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifier>, Error> {
    // A key of another family never verifies (an HS256 token against an RSA key).
    if key.family() != family(*alg) {
        return Err(ErrorKind::InvalidKeyFormat.into());
    }
    Ok(Box::new(RingVerifier {
        alg: *alg,
        key: key.clone(),
    }))
}

struct RingVerifier {
    alg: Algorithm,
    key: DecodingKey,
}

impl RingVerifier {
    fn rsa(&self) -> &'static sig::RsaParameters {
        match self.alg {
            Algorithm::RS384 => &sig::RSA_PKCS1_2048_8192_SHA384,
            Algorithm::RS512 => &sig::RSA_PKCS1_2048_8192_SHA512,
            Algorithm::PS256 => &sig::RSA_PSS_2048_8192_SHA256,
            Algorithm::PS384 => &sig::RSA_PSS_2048_8192_SHA384,
            Algorithm::PS512 => &sig::RSA_PSS_2048_8192_SHA512,
            _ => &sig::RSA_PKCS1_2048_8192_SHA256,
        }
    }
}

impl Verifier<Vec<u8>> for RingVerifier {
    fn verify(&self, msg: &[u8], signature: &Vec<u8>) -> Result<(), signature::Error> {
        let checked = match (family(self.alg), self.key.kind()) {
            (AlgorithmFamily::Rsa, DecodingKeyKind::RsaModulusExponent { n, e }) => {
                sig::RsaPublicKeyComponents { n, e }.verify(self.rsa(), msg, signature)
            }
            (AlgorithmFamily::Rsa, DecodingKeyKind::SecretOrDer(der)) => {
                sig::UnparsedPublicKey::new(self.rsa(), der).verify(msg, signature)
            }
            (AlgorithmFamily::Hmac, DecodingKeyKind::SecretOrDer(secret)) => {
                let alg = match self.alg {
                    Algorithm::HS384 => hmac::HMAC_SHA384,
                    Algorithm::HS512 => hmac::HMAC_SHA512,
                    _ => hmac::HMAC_SHA256,
                };
                hmac::verify(&hmac::Key::new(alg, secret), msg, signature)
            }
            (AlgorithmFamily::Ec, DecodingKeyKind::SecretOrDer(point)) => {
                let alg = match self.alg {
                    Algorithm::ES384 => &sig::ECDSA_P384_SHA384_FIXED,
                    _ => &sig::ECDSA_P256_SHA256_FIXED,
                };
                sig::UnparsedPublicKey::new(alg, point).verify(msg, signature)
            }
            (AlgorithmFamily::Ed, DecodingKeyKind::SecretOrDer(raw)) => {
                sig::UnparsedPublicKey::new(&sig::ED25519, raw).verify(msg, signature)
            }
            _ => Err(ring::error::Unspecified),
        };
        checked.map_err(|_| signature::Error::new())
    }
}

impl JwtVerifier for RingVerifier {
    fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};

    fn check(alg: Algorithm, encoding: &EncodingKey, decoding: &DecodingKey) {
        let token = jsonwebtoken::encode(&Header::new(alg), &serde_json::json!({"a": 1}), encoding)
            .unwrap();
        let (head, signature) = token.rsplit_once('.').unwrap();
        let signature = jsonwebtoken::crypto::verify(signature, head.as_bytes(), decoding, alg);
        let ring = verifier(&alg, decoding).unwrap();
        let raw = {
            use base64::Engine;
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(token.rsplit_once('.').unwrap().1)
                .unwrap()
        };
        assert!(signature.is_ok());
        assert!(ring.verify(head.as_bytes(), &raw).is_ok(), "{alg:?}");
        let mut bad = raw.clone();
        bad[0] ^= 1;
        assert!(ring.verify(head.as_bytes(), &bad).is_err(), "{alg:?}");
        assert!(ring.verify(b"other.message", &raw).is_err(), "{alg:?}");
    }

    #[test]
    fn ring_verifies_what_jsonwebtoken_signs_and_nothing_else() {
        let secret = b"a secret of enough length for hs256";
        check(
            Algorithm::HS256,
            &EncodingKey::from_secret(secret),
            &DecodingKey::from_secret(secret),
        );
        let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        check(
            Algorithm::ES256,
            &EncodingKey::from_ec_pem(ec.serialize_pem().as_bytes()).unwrap(),
            &DecodingKey::from_ec_pem(ec.public_key_pem().as_bytes()).unwrap(),
        );
    }

    #[test]
    fn a_key_of_another_family_is_refused() {
        let rsa = DecodingKey::from_rsa_raw_components(&[1; 256], &[1, 0, 1]);
        assert!(verifier(&Algorithm::HS256, &rsa).is_err());
        let secret = DecodingKey::from_secret(b"s");
        assert!(verifier(&Algorithm::RS256, &secret).is_err());
        assert!(verifier(&Algorithm::ES256, &secret).is_err());
    }
}
