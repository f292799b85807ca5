//! Tables on S3 and S3-compatible stores: builds object_store's `AmazonS3` client for an
//! `s3://bucket/prefix/` LOCATION from the `AWS_*` environment, then the sink's `s3.*` OPTIONS
//! (object_store's `AmazonS3ConfigKey` names without the `aws_` prefix: `endpoint`, `region`,
//! `access_key_id`, `secret_access_key`, `session_token`, `allow_http`, `conditional_put`, ...).
//! Conditional PUT (`If-None-Match: *`) is object_store's default; the probe that checks the
//! store honours it is [`super::store::TableStore::check_atomic_create`].
//!
//! Secrets: values are handed to the client and never formatted into a message; an unknown
//! key is reported by its name only.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;

use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path;
use sluice_sql::OptionError;

use crate::error::{EngineError, Result};

/// Checks that every `s3.*` key (given without its prefix) is a client setting.
pub fn check_keys(keys: &BTreeMap<String, String>) -> Result<(), OptionError> {
    for (k, v) in keys {
        if AmazonS3ConfigKey::from_str(k).is_err() {
            return Err(OptionError {
                key: format!("s3.{k}"),
                message: format!(
                    "'s3.{k}' is not an S3 client setting (e.g. s3.endpoint, s3.region, s3.access_key_id, s3.secret_access_key, s3.session_token, s3.allow_http, s3.conditional_put)"
                ),
            });
        }
        if k == "conditional_put" && !matches!(v.trim(), "etag" | "disabled") {
            return Err(OptionError {
                key: "s3.conditional_put".into(),
                message: format!(
                    "s3.conditional_put is 'etag' (default: atomic commits, any number of writers) or 'disabled' (single-writer mode), got '{v}'"
                ),
            });
        }
    }
    Ok(())
}

/// The client and the table's root path for `location` (`s3://bucket[/prefix]`).
pub fn open(location: &str, settings: &BTreeMap<String, String>) -> Result<(Arc<AmazonS3>, Path)> {
    let bad = |why: &str| {
        EngineError::config(
            format!("bad S3 location '{location}': {why}"),
            Some("write it as s3://bucket/prefix/".to_string()),
        )
    };
    let url = url::Url::parse(location).map_err(|e| bad(&e.to_string()))?;
    let bucket = url
        .host_str()
        .filter(|b| !b.is_empty())
        .ok_or_else(|| bad("no bucket"))?;
    let root = Path::parse(url.path().trim_matches('/')).map_err(|e| bad(&e.to_string()))?;
    let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
    for (k, v) in settings {
        let key = AmazonS3ConfigKey::from_str(k).map_err(|_| {
            EngineError::config(
                format!("'s3.{k}' is not an S3 client setting"),
                Some("see object_store's AmazonS3ConfigKey for the names".to_string()),
            )
        })?;
        builder = builder.with_config(key, v.clone());
    }
    let store = builder.build().map_err(|e| {
        EngineError::config(
            format!("cannot open {location}: {e}"),
            Some("set the s3.* OPTIONS or the AWS_* environment variables (endpoint, region, credentials)".to_string()),
        )
    })?;
    Ok((Arc::new(store), root))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_checked_by_name_without_printing_values() {
        let mut k = BTreeMap::new();
        k.insert("endpoint".to_string(), "http://127.0.0.1:9".to_string());
        k.insert("secret_access_key".to_string(), "hunter2".to_string());
        check_keys(&k).unwrap();
        k.insert("secret_acess_key".to_string(), "hunter2".to_string());
        let e = check_keys(&k).unwrap_err();
        assert_eq!(e.key, "s3.secret_acess_key");
        assert!(!e.message.contains("hunter2"), "{}", e.message);
        let mut k = BTreeMap::new();
        k.insert("conditional_put".to_string(), "maybe".to_string());
        assert!(check_keys(&k).unwrap_err().message.contains("single-writer"));
    }

    #[test]
    fn location_gives_bucket_and_root() {
        let mut k = BTreeMap::new();
        k.insert("endpoint".to_string(), "http://127.0.0.1:9".to_string());
        k.insert("allow_http".to_string(), "true".to_string());
        k.insert("region".to_string(), "us-east-1".to_string());
        let (_, root) = open("s3://lake/tables/orders/", &k).unwrap();
        assert_eq!(root.as_ref(), "tables/orders");
        let (_, root) = open("s3://lake", &k).unwrap();
        assert_eq!(root.as_ref(), "");
        assert!(open("s3:///x", &k).unwrap_err().to_string().contains("no bucket"));
    }
}
