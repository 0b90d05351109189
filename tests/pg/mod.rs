//! A fresh PostgreSQL database for one test, on the server `SWITCHBOARD_TEST_POSTGRES_URL`
//! names (`.ci/postgres.sh` starts one and prints that variable). Each test gets its own
//! database with a random name, dropped when the [`TestDatabase`] is, so tests run in parallel.
//! Without the variable a test prints `SKIPPED` and returns; with
//! `SWITCHBOARD_REQUIRE_CLUSTER_TESTS=1` (set by `.ci/run`) it fails instead.

use tokio_postgres::NoTls;

/// One test's database; dropped (with every connection to it) when this is.
pub struct TestDatabase {
    /// The URL switchboard connects to.
    pub url: String,
    admin: String,
    name: String,
}

fn required() -> bool {
    std::env::var("SWITCHBOARD_REQUIRE_CLUSTER_TESTS").is_ok_and(|v| v == "1")
}

/// A new empty database, or `None` (after printing SKIPPED) when no server is configured.
pub fn database() -> Option<TestDatabase> {
    Some(database_on(&admin_url()?))
}

/// The configured server's administrative URL, or `None` (after printing SKIPPED) when no
/// server is configured.
pub fn admin_url() -> Option<String> {
    let admin = match std::env::var("SWITCHBOARD_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => url,
        _ => {
            assert!(
                !required(),
                "SWITCHBOARD_REQUIRE_CLUSTER_TESTS=1 but SWITCHBOARD_TEST_POSTGRES_URL is not \
                 set (eval \"$(.ci/postgres.sh start)\" sets it)"
            );
            eprintln!(
                "SKIPPED: no PostgreSQL for this test (eval \"$(.ci/postgres.sh start)\" \
                 starts one and sets SWITCHBOARD_TEST_POSTGRES_URL)"
            );
            return None;
        }
    };
    Some(admin)
}

/// A new empty database on the server whose administrative URL is `admin`.
#[allow(dead_code)] // not every test binary that uses this module needs it
pub fn database_on(admin: &str) -> TestDatabase {
    let name = format!("switchboard_test_{}", uuid::Uuid::new_v4().simple());
    run(admin, format!("CREATE DATABASE {name}"))
        .unwrap_or_else(|e| panic!("cannot create a test database on {admin}: {e}"));
    TestDatabase {
        url: with_dbname(admin, &name),
        admin: admin.to_string(),
        name,
    }
}

impl TestDatabase {
    /// Runs SQL statements in this database.
    #[allow(dead_code)] // not every test binary that uses this module needs it
    pub fn execute(&self, sql: &str) {
        run(&self.url, sql.to_string()).unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

impl TestDatabase {
    /// Runs one query in this database; every row's columns as text (`None` for NULL).
    #[allow(dead_code)] // not every test binary that uses this module needs it
    pub fn query(&self, sql: &str) -> Vec<Vec<Option<String>>> {
        on_connection(&self.url, sql.to_string(), |client, sql| async move {
            let messages = client.simple_query(&sql).await?;
            Ok(messages
                .into_iter()
                .filter_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(row) => Some(
                        (0..row.len())
                            .map(|i| row.get(i).map(str::to_string))
                            .collect(),
                    ),
                    _ => None,
                })
                .collect())
        })
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }
}

/// What one writer per log means for a stored log given as (event id, epoch) in id order: the
/// ids are 0..n, and the epochs never go back (no event of an older epoch was committed after
/// one of a newer).
#[allow(dead_code)] // not every test binary that uses this module needs it
pub fn assert_one_writer_per_epoch(log: impl IntoIterator<Item = (u64, i64)>) {
    let log: Vec<(u64, i64)> = log.into_iter().collect();
    for (expected, (id, _)) in log.iter().enumerate() {
        assert_eq!(*id, expected as u64, "ids dense and unique: {log:?}");
    }
    for pair in log.windows(2) {
        assert!(
            pair[0].1 <= pair[1].1,
            "event {} of epoch {} was committed after event {} of epoch {}",
            pair[1].0,
            pair[1].1,
            pair[0].0,
            pair[0].1
        );
    }
}

/// A transaction kept open (its locks held) until this is dropped; then rolled back.
#[allow(dead_code)] // not every test binary that uses this module needs it
pub struct Held {
    release: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.release.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl TestDatabase {
    /// Runs `sql` in a transaction that stays open, holding its locks, until the returned
    /// [`Held`] is dropped.
    #[allow(dead_code)] // not every test binary that uses this module needs it
    pub fn hold(&self, sql: &str) -> Held {
        let (release, released) = std::sync::mpsc::channel::<()>();
        let (started, running) = std::sync::mpsc::channel();
        let sql = format!("BEGIN; {sql}");
        let thread = {
            let url = self.url.clone();
            std::thread::spawn(move || {
                let outcome = on_connection(&url, sql, move |client, sql| async move {
                    if let Err(e) = client.batch_execute(&sql).await {
                        let _ = started.send(Err(e.to_string()));
                        return Err(e);
                    }
                    let _ = started.send(Ok(()));
                    // Blocks this helper's own thread only.
                    let _ = released.recv();
                    client.batch_execute("ROLLBACK").await
                });
                if let Err(e) = outcome {
                    eprintln!("held transaction: {e}");
                }
            })
        };
        match running.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("{e}"),
            Err(_) => panic!("the held transaction did not start"),
        }
        Held {
            release: Some(release),
            thread: Some(thread),
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let drop_it = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        if let Err(e) = run(&self.admin, drop_it) {
            eprintln!("could not drop test database {}: {e}", self.name);
        }
    }
}

/// `url` with its database name replaced by `name`.
fn with_dbname(url: &str, name: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        // The key=value form: a later key wins.
        return format!("{url} dbname={name}");
    };
    let (base, query) = match url.find('?') {
        Some(q) => (&url[..q], &url[q..]),
        None => (url, ""),
    };
    let rest = &base[scheme_end + 3..];
    let authority = rest.find('/').map_or(rest, |slash| &rest[..slash]);
    format!("{}{authority}/{name}{query}", &base[..scheme_end + 3])
}

/// Runs `sql` on a connection of its own, on a runtime of its own (callers may be inside one).
fn run(url: &str, sql: String) -> Result<(), String> {
    on_connection(url, sql, |client, sql| async move {
        client.batch_execute(&sql).await
    })
}

/// Runs `work` with a client on a connection of its own, on a runtime of its own.
fn on_connection<T, F, Fut>(url: &str, sql: String, work: F) -> Result<T, String>
where
    T: Send + 'static,
    F: FnOnce(tokio_postgres::Client, String) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, tokio_postgres::Error>>,
{
    let url = url.to_string();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        runtime.block_on(async move {
            let (client, connection) = tokio_postgres::connect(&url, NoTls)
                .await
                .map_err(|e| e.to_string())?;
            let connection = tokio::spawn(connection);
            let outcome = work(client, sql).await.map_err(|e| match e.as_db_error() {
                Some(db) => db.message().to_string(),
                None => e.to_string(),
            });
            let _ = connection.await;
            outcome
        })
    })
    .join()
    .map_err(|_| "the PostgreSQL helper thread panicked".to_string())?
}
