//! A fresh PostgreSQL database for one test run or benchmark, so that runs sharing one server
//! never see each other's records.

use std::str::FromStr as _;

use dps_core::store::StoreError;

/// A database created for one run; [`ScratchDatabase::drop_database`] removes it.
#[derive(Debug, Clone)]
pub struct ScratchDatabase {
    /// URL of the new database (the server URL with its database name replaced).
    pub url: String,
    /// Its name.
    pub name: String,
    admin: String,
}

async fn admin_client(admin_url: &str) -> Result<tokio_postgres::Client, StoreError> {
    let (client, connection) = tokio_postgres::connect(admin_url, tokio_postgres::NoTls)
        .await
        .map_err(|e| StoreError::Unavailable(format!("cannot reach PostgreSQL to create a scratch database: {e}")))?;
    tokio::spawn(connection);
    Ok(client)
}

/// The environment variable naming the PostgreSQL server tests use.
pub const TEST_SERVER_ENV: &str = "DPS_TEST_POSTGRES_URL";
/// The server tests use when [`TEST_SERVER_ENV`] is unset: the CI machine's (trust auth).
pub const DEFAULT_TEST_SERVER: &str = "postgres://postgres@127.0.0.1:5432/test";

impl ScratchDatabase {
    /// A scratch database on the test server ([`TEST_SERVER_ENV`], else
    /// [`DEFAULT_TEST_SERVER`]); the error says which server was tried and how to name another.
    pub async fn for_test(prefix: &str) -> Result<ScratchDatabase, StoreError> {
        let server = std::env::var(TEST_SERVER_ENV).unwrap_or_else(|_| DEFAULT_TEST_SERVER.into());
        Self::create(&server, prefix).await.map_err(|e| {
            StoreError::Unavailable(format!("this test needs PostgreSQL at {server} (set {TEST_SERVER_ENV}): {e}"))
        })
    }

    /// Creates `dps_<prefix>_<random>` on the server `admin_url` names (connected to without TLS;
    /// the role needs `CREATEDB`).
    pub async fn create(admin_url: &str, prefix: &str) -> Result<ScratchDatabase, StoreError> {
        let clean: String = prefix.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '_').take(30).collect();
        let name = format!("dps_{}_{}_{:08x}", clean.to_ascii_lowercase(), std::process::id(), rand::random::<u32>());
        let client = admin_client(admin_url).await?;
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .map_err(|e| StoreError::Other(format!("cannot create the scratch database {name}: {e}")))?;
        let url = with_database(admin_url, &name)?;
        Ok(ScratchDatabase { url, name, admin: admin_url.to_string() })
    }

    /// The URL of database `name` on the server `server_url` names.
    pub fn url_of(server_url: &str, name: &str) -> Result<String, StoreError> {
        with_database(server_url, name)
    }

    /// Drops the database (closing the sessions still on it).
    pub async fn drop_database(&self) -> Result<(), StoreError> {
        let client = admin_client(&self.admin).await?;
        client
            .batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name))
            .await
            .map_err(|e| StoreError::Other(format!("cannot drop the scratch database {}: {e}", self.name)))
    }
}

/// `url` naming database `name` instead (URL form or key/value form).
fn with_database(url: &str, name: &str) -> Result<String, StoreError> {
    tokio_postgres::Config::from_str(url).map_err(|e| StoreError::Other(format!("not a PostgreSQL URL: {e}")))?;
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let (base, query) = match url.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (url, None),
        };
        let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
        let authority_end = base[scheme_end..].find('/').map(|i| i + scheme_end).unwrap_or(base.len());
        let mut out = format!("{}/{name}", &base[..authority_end]);
        if let Some(q) = query {
            out.push('?');
            out.push_str(q);
        }
        Ok(out)
    } else {
        Ok(format!("{url} dbname={name}"))
    }
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn replaces_the_database_name() {
        assert_eq!(with_database("postgres://u@h:5432/test", "x").unwrap(), "postgres://u@h:5432/x");
        assert_eq!(with_database("postgres://u@h", "x").unwrap(), "postgres://u@h/x");
        assert_eq!(
            with_database("postgresql://u:p@h/test?sslmode=disable", "x").unwrap(),
            "postgresql://u:p@h/x?sslmode=disable"
        );
        assert_eq!(with_database("host=h user=u dbname=test", "x").unwrap(), "host=h user=u dbname=test dbname=x");
    }
}
