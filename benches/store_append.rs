//! Appends per second into the SQLite store, with and without group commit.
//!
//! `cargo bench --bench store_append` (about 20 s); add `-- --quick` (or set
//! `SWITCHBOARD_BENCH_QUICK=1`) for a ~4 s run, or `SWITCHBOARD_BENCH_SECS=<seconds>` to set the
//! time each scenario runs. Every scenario uses a fresh database in a temp dir; each append
//! carries one ~250-byte event and is awaited before its writer issues the next one (as a
//! conversation actor does), so the numbers are committed events per second.

use std::time::{Duration, Instant};

use serde_json::json;
use switchboard::config::StoreTuning;
use switchboard::events::{EventBody, Source};
use switchboard::store::{ConversationMeta, InitData, SqliteStore, Store};

struct Scenario {
    name: &'static str,
    batch_max: usize,
    /// Conversations appending concurrently, one awaited append at a time each.
    writers: usize,
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "group commit, 64 conversations",
        batch_max: 512,
        writers: 64,
    },
    Scenario {
        name: "group commit, 8 conversations",
        batch_max: 512,
        writers: 8,
    },
    Scenario {
        name: "no batching, 64 conversations",
        batch_max: 1,
        writers: 64,
    },
    Scenario {
        name: "no batching, appends one at a time",
        batch_max: 1,
        writers: 1,
    },
];

fn meta(id: &str) -> ConversationMeta {
    ConversationMeta {
        conversation_id: id.to_string(),
        title: format!("Bench {id}"),
        created_at: "2024-01-01T00:00:00.000000Z".into(),
        last_updated_at: "2024-01-01T00:00:00.000000Z".into(),
        trigger: "gui".into(),
        owner: None,
        init: InitData::default(),
    }
}

async fn run(scenario: &Scenario, duration: Duration) -> Result<(u64, Duration), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let tuning = StoreTuning {
        batch_max: scenario.batch_max,
        queue: 1024,
    };
    let store = SqliteStore::open(dir.path(), &tuning).map_err(|e| e.to_string())?;
    let body = EventBody::message(
        Source::Agent,
        "The build passed. I updated src/lib.rs and added two tests; next I will run clippy.",
        json!([]),
        false,
    );
    for w in 0..scenario.writers {
        store
            .create(meta(&format!("c{w}")))
            .await
            .map_err(|e| e.to_string())?;
    }
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    for w in 0..scenario.writers {
        let store = store.clone();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let id = format!("c{w}");
            let mut next = 0u64;
            while Instant::now() < deadline {
                let event = body.stamp(next, "2024-05-01T12:00:00.000000");
                store.append(&id, vec![event]).await?;
                next += 1;
            }
            Ok::<u64, switchboard::store::StoreError>(next)
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
    }
    let elapsed = started.elapsed();
    store.close().await;
    Ok((total, elapsed))
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

    println!("SQLite store appends (WAL, synchronous=NORMAL), {secs} s per scenario\n");
    println!(
        "{:<36} {:>9} {:>8} {:>10} {:>12}",
        "scenario", "batch_max", "writers", "events", "events/s"
    );
    for scenario in SCENARIOS {
        match runtime.block_on(run(scenario, duration)) {
            Ok((events, elapsed)) => println!(
                "{:<36} {:>9} {:>8} {:>10} {:>12.0}",
                scenario.name,
                scenario.batch_max,
                scenario.writers,
                events,
                events as f64 / elapsed.as_secs_f64()
            ),
            Err(e) => println!("{:<36} failed: {e}", scenario.name),
        }
    }
}
