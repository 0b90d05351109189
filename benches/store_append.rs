//! Appends per second into the SQLite store and the PostgreSQL store, with and without group
//! commit, and the write pattern of `POST /api/conversations` (a new conversation with a random
//! id, then its first events).
//!
//! The PostgreSQL scenarios run when `SWITCHBOARD_TEST_POSTGRES_URL` names a server
//! (`eval "$(.ci/postgres.sh start)"` starts a local one), each in a fresh database; the
//! argument `sqlite` or `postgres` runs one backend only.
//!
//! `cargo bench --bench store_append` (about 30 s); add `-- --quick` (or set
//! `SWITCHBOARD_BENCH_QUICK=1`) for a ~6 s run, or `SWITCHBOARD_BENCH_SECS=<seconds>` to set the
//! time each scenario runs; other arguments pick the scenarios whose names contain one of them
//! (`-- --quick "new conv"`). Every scenario uses a fresh database in a temp dir, with the
//! server's default quotas and disk reserve (`[limits]`); each event is
//! ~250 bytes of JSON. A writer awaits its appends before issuing more (as a conversation actor
//! does while idle), except with "in flight", where it keeps that many appends queued (as an
//! actor emitting faster than the store commits does). So the numbers are committed events
//! (and, for the creating scenario, committed new conversations) per second, and the CPU time
//! the writer thread and the whole bench process spent per event (Linux only; the process
//! includes the tasks issuing the writes; for PostgreSQL the "writer" is the store's thread,
//! and the PostgreSQL server's own CPU is not counted).

#[path = "../tests/pg/mod.rs"]
mod pg;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use switchboard::config::{PostgresSettings, Settings, StoreTuning};
use switchboard::conversation::{ConversationId, ConversationMeta, InitData};
use switchboard::events::{meta_timestamp, EventBody, Source};
use switchboard::store::{Acquired, PostgresStore, SqliteStore, Store, StoreError, StoreLimits};

/// Which store a scenario runs on.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

/// An open store and what must outlive it.
enum Opened {
    Sqlite(SqliteStore, tempfile::TempDir),
    Postgres(PostgresStore, pg::TestDatabase),
}

impl Opened {
    fn open(backend: Backend, tuning: &StoreTuning, limits: StoreLimits) -> Result<Opened, String> {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
                let store = SqliteStore::open_with(dir.path(), tuning, limits)
                    .map_err(|e| e.to_string())?;
                Ok(Opened::Sqlite(store, dir))
            }
            Backend::Postgres => {
                let db = pg::database().ok_or("no PostgreSQL server")?;
                let settings = PostgresSettings {
                    url: db.url.clone(),
                    pool_size: 8,
                };
                let store = PostgresStore::open_with(&settings, tuning, limits)
                    .map_err(|e| e.to_string())?;
                Ok(Opened::Postgres(store, db))
            }
        }
    }

    fn store(&self) -> Arc<dyn Store> {
        match self {
            Opened::Sqlite(store, _) => Arc::new(store.clone()),
            Opened::Postgres(store, _) => Arc::new(store.clone()),
        }
    }

    async fn close(self) {
        match self {
            Opened::Sqlite(store, _dir) => store.close().await,
            Opened::Postgres(store, _db) => store.close().await,
        }
    }
}

#[derive(Clone, Copy)]
enum Work {
    /// Appends of one event to a conversation created beforehand; `in_flight` appends queued
    /// at a time per conversation. `owned`: acquired first and appended under its lease, as
    /// the server does (on PostgreSQL each append then also checks the lease).
    Appends { in_flight: usize, owned: bool },
    /// Over and over: create a conversation with a random (uuid4 hex) id, then append its
    /// first two events — what each `POST /api/conversations` asks of the store.
    NewConversations,
}

struct Scenario {
    name: &'static str,
    batch_max: usize,
    /// Concurrent writers (conversations appending, or creators).
    writers: usize,
    work: Work,
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "group commit, 64 conversations",
        batch_max: 512,
        writers: 64,
        work: Work::Appends {
            in_flight: 1,
            owned: false,
        },
    },
    Scenario {
        name: "group commit, 64 conv., owned",
        batch_max: 512,
        writers: 64,
        work: Work::Appends {
            in_flight: 1,
            owned: true,
        },
    },
    Scenario {
        name: "group commit, 8 conversations",
        batch_max: 512,
        writers: 8,
        work: Work::Appends {
            in_flight: 1,
            owned: false,
        },
    },
    Scenario {
        name: "group commit, 8 conv., 8 in flight",
        batch_max: 512,
        writers: 8,
        work: Work::Appends {
            in_flight: 8,
            owned: false,
        },
    },
    Scenario {
        name: "no batching, 64 conversations",
        batch_max: 1,
        writers: 64,
        work: Work::Appends {
            in_flight: 1,
            owned: false,
        },
    },
    Scenario {
        name: "no batching, appends one at a time",
        batch_max: 1,
        writers: 1,
        work: Work::Appends {
            in_flight: 1,
            owned: false,
        },
    },
    Scenario {
        name: "new conversations, 64 creators",
        batch_max: 512,
        writers: 64,
        work: Work::NewConversations,
    },
];

/// The conversation id `text` (the benchmark's ids are valid).
fn cid(text: impl AsRef<str>) -> ConversationId {
    ConversationId::parse(text.as_ref()).expect("a valid conversation id")
}

fn meta(id: &str) -> ConversationMeta {
    ConversationMeta {
        conversation_id: cid(id),
        title: format!("Bench {id}"),
        created_at: "2024-01-01T00:00:00.000000Z".into(),
        last_updated_at: "2024-01-01T00:00:00.000000Z".into(),
        trigger: switchboard::conversation::Trigger::Gui,
        owner: None,
        init: InitData::default(),
    }
}

/// What one writer got done.
#[derive(Default)]
struct Done {
    events: u64,
    conversations: u64,
}

async fn append_loop(
    store: Arc<dyn Store>,
    body: EventBody,
    id: String,
    in_flight: usize,
    owned: bool,
    deadline: Instant,
) -> Result<Done, StoreError> {
    let lease = match owned {
        true => match store.acquire(&cid(&id), None).await? {
            Acquired::Owned(lease) => Some(lease),
            other => {
                return Err(StoreError::Io(
                    format!("{id} not granted: {other:?}").into(),
                ))
            }
        },
        false => None,
    };
    let mut next = 0u64;
    let mut pending = VecDeque::new();
    while Instant::now() < deadline {
        while pending.len() < in_flight {
            let event = body.stamp(next, "2024-05-01T12:00:00.000000");
            pending.push_back(match lease {
                Some(lease) => store.append_owned(&cid(&id), lease, vec![event]),
                None => store.append(&cid(&id), vec![event]),
            });
            next += 1;
        }
        if let Some(oldest) = pending.pop_front() {
            oldest.await?;
        }
    }
    let unfinished = pending.len() as u64;
    for append in pending {
        append.await?;
    }
    // Appends still queued at the deadline completed after it: not counted.
    Ok(Done {
        events: next - unfinished,
        conversations: 0,
    })
}

async fn create_loop(
    store: Arc<dyn Store>,
    body: EventBody,
    deadline: Instant,
) -> Result<Done, StoreError> {
    let mut done = Done::default();
    while Instant::now() < deadline {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let mut meta = meta(&id);
        meta.created_at = meta_timestamp();
        meta.last_updated_at = meta.created_at.clone();
        store.create(meta).await?;
        let at = "2024-05-01T12:00:00.000000";
        store
            .append(&cid(&id), vec![body.stamp(0, at), body.stamp(1, at)])
            .await?;
        done.conversations += 1;
        done.events += 2;
    }
    Ok(done)
}

/// The ids of this process's store writer threads (Linux only).
fn writer_threads() -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm"))
                .is_ok_and(|comm| matches!(comm.trim(), "store-writer" | "store-postgres"))
        })
        .map(|task| task.file_name().to_string_lossy().into_owned())
        .collect()
}

/// CPU seconds used so far by thread `writer` and by the whole process (Linux only).
fn cpu_seconds(writer: Option<&str>) -> Option<(f64, f64)> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: plain libc calls writing into a zeroed struct we own.
        let (tick, usage) = unsafe {
            let mut usage: libc::rusage = std::mem::zeroed();
            if libc::getrusage(libc::RUSAGE_SELF, &mut usage) != 0 {
                return None;
            }
            (libc::sysconf(libc::_SC_CLK_TCK) as f64, usage)
        };
        let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        let process = seconds(usage.ru_utime) + seconds(usage.ru_stime);
        let stat = std::fs::read_to_string(format!("/proc/self/task/{}/stat", writer?)).ok()?;
        // After the ")" closing the name: field 3 (state) first; utime and stime are the 14th
        // and 15th fields.
        let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
        let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
        Some((ticks / tick, process))
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = writer;
        None
    }
}

/// A scenario's outcome.
struct Outcome {
    done: Done,
    elapsed: Duration,
    /// CPU seconds of the writer thread and of the process during the scenario.
    cpu: Option<(f64, f64)>,
}

async fn run(scenario: &Scenario, backend: Backend, duration: Duration) -> Result<Outcome, String> {
    let tuning = StoreTuning {
        batch_max: scenario.batch_max,
        queue: 1024,
    };
    let earlier = writer_threads();
    // The server's default quotas and disk reserve, so that their checks are measured too.
    let limits = StoreLimits::from_limits(&Settings::defaults().limits);
    let opened = Opened::open(backend, &tuning, limits)?;
    let store = opened.store();

    let body = EventBody::message(
        Source::Agent,
        "The build passed. I updated src/lib.rs and added two tests; next I will run clippy.",
        json!([]),
        false,
    );
    if let Work::Appends { .. } = scenario.work {
        for w in 0..scenario.writers {
            store
                .create(meta(&format!("c{w}")))
                .await
                .map_err(|e| e.to_string())?;
        }
    }
    // The writer thread has named itself once it has answered a request.
    store.flush().await.map_err(|e| e.to_string())?;
    let writer = writer_threads()
        .into_iter()
        .find(|tid| !earlier.contains(tid));
    let cpu_before = cpu_seconds(writer.as_deref());
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    for w in 0..scenario.writers {
        let store = store.clone();
        let body = body.clone();
        tasks.push(tokio::spawn(match scenario.work {
            Work::Appends { in_flight, owned } => {
                let id = format!("c{w}");
                futures_util::future::Either::Left(append_loop(
                    store,
                    body,
                    id,
                    in_flight.max(1),
                    owned,
                    deadline,
                ))
            }
            Work::NewConversations => {
                futures_util::future::Either::Right(create_loop(store, body, deadline))
            }
        }));
    }
    let mut total = Done::default();
    for task in tasks {
        let done = task
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        total.events += done.events;
        total.conversations += done.conversations;
    }
    let elapsed = started.elapsed();
    let cpu = cpu_before
        .zip(cpu_seconds(writer.as_deref()))
        .map(|((w0, p0), (w1, p1))| (w1 - w0, p1 - p0));
    drop(store);
    opened.close().await;
    Ok(Outcome {
        done: total,
        elapsed,
        cpu,
    })
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick")
        || std::env::var_os("SWITCHBOARD_BENCH_QUICK").is_some();
    let secs = std::env::var("SWITCHBOARD_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .unwrap_or(if quick { 1.0 } else { 5.0 });
    let duration = Duration::from_secs_f64(secs);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start a runtime: {e}");
            std::process::exit(1);
        }
    };

    // `sqlite` or `postgres` picks a backend; any other argument picks the scenarios whose
    // names contain it.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let (backend_args, filters): (Vec<String>, Vec<String>) = args
        .into_iter()
        .partition(|a| a == "sqlite" || a == "postgres");
    let mut backends = vec![Backend::Sqlite, Backend::Postgres];
    if !backend_args.is_empty() {
        backends.retain(|b| backend_args.iter().any(|a| a == b.name()));
    }
    for backend in backends {
        match backend {
            Backend::Sqlite => {
                println!("SQLite store appends (WAL, synchronous=NORMAL), {secs} s per scenario\n")
            }
            Backend::Postgres => {
                if std::env::var("SWITCHBOARD_TEST_POSTGRES_URL").is_err() {
                    println!(
                        "PostgreSQL store: skipped (no SWITCHBOARD_TEST_POSTGRES_URL; \
                         eval \"$(.ci/postgres.sh start)\" starts a server)"
                    );
                    continue;
                }
                println!(
                    "\nPostgreSQL store appends (local server, synchronous_commit=on), \
                     {secs} s per scenario\n"
                )
            }
        }
        bench_backend(&runtime, backend, &filters, duration);
    }
}

fn bench_backend(
    runtime: &tokio::runtime::Runtime,
    backend: Backend,
    filters: &[String],
    duration: Duration,
) {
    println!(
        "{:<36} {:>9} {:>8} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "scenario", "batch_max", "writers", "events", "events/s", "new conv/s", "writer", "process"
    );
    println!(
        "{:<36} {:>9} {:>8} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "", "", "", "", "", "", "µs cpu/ev", "µs cpu/ev"
    );
    let picked = SCENARIOS
        .iter()
        .filter(|s| filters.is_empty() || filters.iter().any(|f| s.name.contains(f.as_str())));
    for scenario in picked {
        match runtime.block_on(run(scenario, backend, duration)) {
            Ok(Outcome { done, elapsed, cpu }) => {
                let per_sec = |n: u64| n as f64 / elapsed.as_secs_f64();
                let conversations = match scenario.work {
                    Work::NewConversations => format!("{:.0}", per_sec(done.conversations)),
                    Work::Appends { .. } => "-".to_string(),
                };
                let per_event = |seconds: f64| format!("{:.1}", seconds * 1e6 / done.events as f64);
                let (writer, process) = match cpu {
                    Some((w, p)) if done.events > 0 => (per_event(w), per_event(p)),
                    _ => ("-".to_string(), "-".to_string()),
                };
                println!(
                    "{:<36} {:>9} {:>8} {:>10} {:>10.0} {:>10} {:>10} {:>10}",
                    scenario.name,
                    scenario.batch_max,
                    scenario.writers,
                    done.events,
                    per_sec(done.events),
                    conversations,
                    writer,
                    process
                )
            }
            Err(e) => println!("{:<36} failed: {e}", scenario.name),
        }
    }
}
