//! TPM public areas (`endorsementKey` / `storageRootKey`, base64-decoded) and authentication-key
//! blobs on arbitrary bytes: parsing refuses or accepts, never panics, and whatever it accepts
//! marshals back to exactly the input (the encoding is canonical), with a computable Name.
#![no_main]

use dps_proto::tpm::{AuthenticationKeyBlob, TpmPublic};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(public) = TpmPublic::parse_tpm2b(data) {
        assert_eq!(public.marshal_tpm2b().expect("a parsed public area marshals"), data);
        let _ = public.name();
        assert_eq!(public.same_rsa_key(&public), public.rsa().is_some());
    }
    if let Ok(public) = TpmPublic::parse(data) {
        assert_eq!(public.marshal().expect("a parsed public area marshals"), data);
        let name = public.name();
        if let Ok(name) = name {
            assert_eq!(name[..2], public.name_alg.to_be_bytes());
        }
    }
    if let Ok(blob) = AuthenticationKeyBlob::parse(data) {
        assert_eq!(blob.marshal().expect("a parsed blob marshals"), data);
        let _ = TpmPublic::parse(&blob.public);
    }
});
