//! One crypto stack for TLS: `ring`, as the MongoDB driver uses.
//!
//! Google's crates are built without their default provider (`aws-lc-rs`,
//! a C library that took minutes of every clean build), so the process
//! must install one before a Google client is built.

/// Installs `ring` as the process's rustls provider unless one is already
/// installed. Called before every Google client is built; call it yourself
/// before building one with Google's crates directly.
pub fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // A concurrent caller may win the race; either way one is installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_provider_is_installed_once_and_stays() {
        super::install_crypto_provider();
        super::install_crypto_provider();
        assert!(rustls::crypto::CryptoProvider::get_default().is_some());
    }
}
