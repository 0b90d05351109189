//! What the PostgreSQL store promises the nodes of a cluster sharing one database: at most one
//! node owns a conversation at a time, and every epoch is granted once; an append commits only
//! under the conversation's current lease, checked in its own transaction, so once an event of
//! epoch e+1 is committed no event of an earlier epoch ever is, and the log's ids stay dense and
//! unique; a node whose registration lapsed writes nothing more, fences itself and comes back
//! with a new incarnation; release and a clean close free a conversation at once; a user's
//! conversations owned by live nodes never exceed its limit, however many nodes take them at
//! once. Each "node" here is a store opened with its own node id on one fresh database (see
//! `tests/pg`); without a server the tests print SKIPPED.

mod common;
mod pg;
use common::{cid, meta};

use std::time::Duration;

use futures_util::future::join_all;
use serde_json::json;
use switchboard::config::{PostgresSettings, StoreTuning};
use switchboard::events::{EventBody, Source, StoredEvent};
use switchboard::store::{
    Acquired, ClusterNode, Lease, Membership, PostgresStore, Store, StoreError, StoreLimits,
    UserQuota,
};

const T0: &str = "2024-01-01T00:00:00.000000Z";

fn node(url: &str, name: &str) -> PostgresStore {
    PostgresStore::open_node(
        &PostgresSettings {
            url: url.to_string(),
            pool_size: 4,
        },
        &StoreTuning {
            batch_max: 512,
            queue: 1024,
        },
        StoreLimits::default(),
        ClusterNode {
            node_id: name.to_string(),
            advertise_url: format!("http://{name}.example"),
            heartbeat: Duration::from_millis(100),
            ttl: Duration::from_secs(30),
        },
    )
    .expect("open")
}

fn event(id: u64) -> StoredEvent {
    EventBody::message(Source::Agent, &format!("reply {id}"), json!([]), false)
        .stamp(id, "2024-05-01T12:00:00.000000")
}

async fn owned(store: &PostgresStore, id: &str) -> Lease {
    match store.acquire(&cid(id), None).await.expect("acquire") {
        Acquired::Owned(lease) => lease,
        other => panic!("{id} is not granted: {other:?}"),
    }
}

/// Makes `node`'s registration expire now, by the database's clock.
fn expire(db: &pg::TestDatabase, node: &str) {
    db.execute(&format!(
        "UPDATE cluster_nodes SET expires_at = now() - interval '1 second' \
         WHERE node_id = '{node}'"
    ));
}

/// Every stored event of `id` as (event id, epoch), in id order.
fn log(db: &pg::TestDatabase, id: &str) -> Vec<(u64, i64)> {
    db.query(&format!(
        "SELECT e.id, e.epoch FROM events e JOIN conversations c ON c.seq = e.conv_seq \
         WHERE c.id = '{id}' ORDER BY e.id"
    ))
    .into_iter()
    .map(|row| {
        let number = |i: usize| row[i].as_deref().expect("not null").to_string();
        (
            number(0).parse().expect("id"),
            number(1).parse().expect("epoch"),
        )
    })
    .collect()
}

async fn wait_for_incarnation(store: &PostgresStore, above: i64) -> i64 {
    let mut membership = store.membership().expect("a PostgreSQL store");
    let state = tokio::time::timeout(
        Duration::from_secs(30),
        membership
            .wait_for(|m| matches!(m, Membership::Live { incarnation } if *incarnation > above)),
    )
    .await
    .expect("the node registers again")
    .expect("the store is open");
    match *state {
        Membership::Live { incarnation } => incarnation,
        Membership::Fenced => unreachable!(),
    }
}

#[tokio::test]
async fn one_owner_at_a_time_and_each_takeover_raises_the_epoch() {
    let Some(db) = pg::database() else { return };
    let (a, b) = (node(&db.url, "a"), node(&db.url, "b"));
    a.create(meta("c", T0)).await.expect("create");

    let first = owned(&a, "c").await;
    assert_eq!(first.epoch, 1);
    match b.acquire(&cid("c"), None).await.expect("acquire") {
        Acquired::Elsewhere(owner) => {
            assert_eq!(owner.node_id, "a");
            assert_eq!(owner.url, "http://a.example");
        }
        other => panic!("a live owner keeps it: {other:?}"),
    }
    a.append_owned(&cid("c"), first, vec![event(0), event(1)])
        .await
        .expect("the owner appends");

    // Released: another node takes it at once, one epoch later.
    a.release(&cid("c"), first).await.expect("release");
    let second = owned(&b, "c").await;
    assert_eq!(second.epoch, 2);
    match a.append_owned(&cid("c"), first, vec![event(2)]).await {
        Err(StoreError::Fenced(why)) => assert!(why.contains("conversation c"), "{why}"),
        other => panic!("the old lease is fenced: {other:?}"),
    }
    b.append_owned(&cid("c"), second, vec![event(2)])
        .await
        .expect("the new owner continues the log");
    // A release under a lease that is no longer current changes nothing.
    a.release(&cid("c"), first).await.expect("stale release");
    assert!(matches!(
        a.acquire(&cid("c"), None).await.expect("acquire"),
        Acquired::Elsewhere(_)
    ));
    assert_eq!(log(&db, "c"), vec![(0, 1), (1, 1), (2, 2)]);
}

#[tokio::test]
async fn concurrent_acquires_from_three_nodes_grant_one_owner() {
    let Some(db) = pg::database() else { return };
    let nodes = [node(&db.url, "a"), node(&db.url, "b"), node(&db.url, "c")];
    let attempts = (0..200).map(|i| nodes[i % 3].acquire(&cid("x"), None));
    let outcomes = join_all(attempts).await;
    let mut owners = Vec::new();
    for (i, outcome) in outcomes.into_iter().enumerate() {
        match outcome.expect("acquire") {
            Acquired::Owned(lease) => owners.push((i % 3, lease)),
            Acquired::Elsewhere(_) => {}
            other => panic!("no user, no limit: {other:?}"),
        }
    }
    // The owner may acquire again (its own conversation): always the same node, and every
    // grant a new epoch.
    let first = owners.first().expect("someone owns it").0;
    assert!(owners.iter().all(|(n, _)| *n == first), "{owners:?}");
    let mut epochs: Vec<i64> = owners.iter().map(|(_, l)| l.epoch).collect();
    epochs.sort();
    epochs.dedup();
    assert_eq!(epochs.len(), owners.len(), "each epoch granted once");
}

/// A quota of `max_running` conversations for `user`.
fn quota(user: &str, max_running: usize) -> Option<UserQuota> {
    Some(UserQuota {
        user: user.to_string(),
        max_running,
    })
}

/// The conversations of `user` with an owner, as the ownership table holds them.
fn held_by(db: &pg::TestDatabase, user: &str) -> usize {
    db.query(&format!(
        "SELECT 1 FROM ownership WHERE user_id = '{user}' AND node_id IS NOT NULL"
    ))
    .len()
}

/// `limits.max_running_per_user` across nodes: of 60 concurrent acquires of one user's new
/// conversations over three nodes with a limit of 5, exactly 5 are granted and the refused ones
/// leave no ownership row; another user is not counted, a release or a lapsed node frees its
/// slots at once.
#[tokio::test]
async fn a_user_limit_is_exact_across_nodes() {
    let Some(db) = pg::database() else { return };
    let nodes = [node(&db.url, "a"), node(&db.url, "b"), node(&db.url, "c")];
    // 60 concurrent acquires of distinct conversations of one user, limit 5, over 3 nodes.
    let attempts = (0..60).map(|i| nodes[i % 3].acquire(&cid(format!("c{i}")), quota("alice", 5)));
    let outcomes = join_all(attempts).await;
    let mut granted = Vec::new();
    for (i, outcome) in outcomes.into_iter().enumerate() {
        match outcome.expect("acquire") {
            Acquired::Owned(lease) => granted.push((i, lease)),
            Acquired::UserLimit { limit } => assert_eq!(limit, 5),
            other => panic!("c{i}: {other:?}"),
        }
    }
    assert_eq!(granted.len(), 5, "exactly the limit granted: {granted:?}");
    assert_eq!(held_by(&db, "alice"), 5, "a refused acquire leaves no row");
    assert_eq!(db.query("SELECT 1 FROM ownership").len(), 5);

    // Another user is not counted with alice; an acquire again of one of hers is not a new one.
    assert!(matches!(
        nodes[0]
            .acquire(&cid("b0"), quota("bob", 5))
            .await
            .expect("acquire"),
        Acquired::Owned(_)
    ));
    let (i, lease) = granted[0];
    let holder = &nodes[i % 3];
    assert!(for_alice(holder, &format!("c{i}")).await);
    assert!(!for_alice(&nodes[1], "more").await);
    // A release frees a slot at once; so does a node whose registration lapsed.
    let again = owned_as(holder, &format!("c{i}"), "alice").await;
    assert_eq!(again.epoch, lease.epoch + 2);
    holder
        .release(&cid(format!("c{i}")), again)
        .await
        .expect("release");
    assert!(for_alice(&nodes[1], "more").await);
    assert!(!for_alice(&nodes[1], "more-still").await);
    let lapsed = granted
        .iter()
        .filter(|(j, _)| *j != i && j % 3 == 2)
        .count();
    expire(&db, "c");
    let first = &nodes[0];
    let freed = (0..lapsed).map(|k| {
        let id = format!("after-{k}");
        async move { for_alice(first, &id).await }
    });
    assert!(join_all(freed).await.into_iter().all(|granted| granted));
    assert!(!for_alice(&nodes[0], "one-too-many").await);
}

/// Whether `store` grants conversation `id` of alice under a limit of 5 (else: refused for
/// that limit).
async fn for_alice(store: &PostgresStore, id: &str) -> bool {
    match store
        .acquire(&cid(id), quota("alice", 5))
        .await
        .expect("acquire")
    {
        Acquired::Owned(_) => true,
        Acquired::UserLimit { limit: 5 } => false,
        other => panic!("{id}: {other:?}"),
    }
}

/// [`owned`] of a conversation of `user` (under a generous limit).
async fn owned_as(store: &PostgresStore, id: &str, user: &str) -> Lease {
    match store
        .acquire(&cid(id), quota(user, 1000))
        .await
        .expect("acquire")
    {
        Acquired::Owned(lease) => lease,
        other => panic!("{id} is not granted: {other:?}"),
    }
}

#[tokio::test]
async fn a_takeover_fences_the_old_owner_and_no_older_epoch_follows_a_newer_one() {
    let Some(db) = pg::database() else { return };
    let (a, b) = (node(&db.url, "a"), node(&db.url, "b"));
    a.create(meta("c", T0)).await.expect("create");
    let old = owned(&a, "c").await;

    // The old owner writes continuously, many appends in flight at once, while its
    // registration lapses and another node takes the conversation over.
    let writer = {
        let a = a.clone();
        tokio::spawn(async move {
            let mut next = 0u64;
            loop {
                let batch: Vec<_> = (next..next + 8)
                    .map(|id| a.append_owned(&cid("c"), old, vec![event(id)]))
                    .collect();
                let outcomes = join_all(batch).await;
                let written = outcomes.iter().take_while(|o| o.is_ok()).count() as u64;
                next += written;
                if written < 8 {
                    return (next, outcomes);
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    expire(&db, "a");
    let new = owned(&b, "c").await;
    assert!(new.epoch > old.epoch);
    let (written, outcomes) = writer.await.expect("writer");
    assert!(written > 0, "the old owner wrote before the takeover");
    // The first refused append is fenced (the later ones of its batch then miss their ids).
    let first_refused = outcomes.iter().find_map(|o| o.as_ref().err());
    assert!(
        matches!(first_refused, Some(StoreError::Fenced(_))),
        "{first_refused:?}"
    );

    let next = b
        .get(&cid("c"))
        .await
        .expect("get")
        .expect("exists")
        .next_event_id;
    assert_eq!(
        next, written,
        "the new owner continues after what was written"
    );
    b.append_owned(&cid("c"), new, (next..next + 3).map(event).collect())
        .await
        .expect("the new owner appends");
    match a.append_owned(&cid("c"), old, vec![event(next + 3)]).await {
        Err(StoreError::Fenced(_)) => {}
        other => panic!("the old owner stays fenced: {other:?}"),
    }
    let log = log(&db, "c");
    assert_eq!(log.len() as u64, next + 3);
    pg::assert_one_writer_per_epoch(log.iter().copied());
    assert!(log.iter().any(|(_, e)| *e == old.epoch));
    assert!(log.iter().any(|(_, e)| *e == new.epoch));
}

#[tokio::test]
async fn a_lapsed_node_writes_nothing_fences_itself_and_returns_with_a_new_incarnation() {
    let Some(db) = pg::database() else { return };
    let a = node(&db.url, "a");
    a.create(meta("c", T0)).await.expect("create");
    let lease = owned(&a, "c").await;
    a.append_owned(&cid("c"), lease, vec![event(0)])
        .await
        .expect("append");

    expire(&db, "a");
    // Nobody took it over, yet an expired registration writes nothing.
    assert!(matches!(
        a.append_owned(&cid("c"), lease, vec![event(1)]).await,
        Err(StoreError::Fenced(_))
    ));
    let incarnation = wait_for_incarnation(&a, lease.incarnation).await;
    let again = owned(&a, "c").await;
    assert_eq!(again.incarnation, incarnation);
    assert_eq!(again.epoch, lease.epoch + 1);
    a.append_owned(&cid("c"), again, vec![event(1)])
        .await
        .expect("append under the new lease");
    assert_eq!(log(&db, "c"), vec![(0, 1), (1, 2)]);
}

#[tokio::test]
async fn closing_a_node_frees_what_it_owned() {
    let Some(db) = pg::database() else { return };
    let (a, b) = (node(&db.url, "a"), node(&db.url, "b"));
    owned(&a, "c1").await;
    tokio::time::timeout(Duration::from_secs(30), a.close())
        .await
        .expect("closed");
    assert_eq!(owned(&b, "c1").await.epoch, 2, "a closed node owns nothing");
}

#[tokio::test]
async fn a_create_under_a_stale_lease_writes_nothing() {
    let Some(db) = pg::database() else { return };
    let (a, b) = (node(&db.url, "a"), node(&db.url, "b"));
    let old = owned(&a, "new").await;
    expire(&db, "a");
    let new = owned(&b, "new").await;
    match a.create_owned(meta("new", T0), old, vec![event(0)]).await {
        Err(StoreError::Fenced(_)) => {}
        other => panic!("the old lease is fenced: {other:?}"),
    }
    assert!(
        a.get(&cid("new")).await.expect("get").is_none(),
        "nothing created"
    );
    b.create_owned(meta("new", T0), new, vec![event(0), event(1)])
        .await
        .expect("the owner creates it");
    assert_eq!(log(&db, "new"), vec![(0, new.epoch), (1, new.epoch)]);
}

#[tokio::test]
async fn a_deleted_conversation_starts_over_and_unknown_ids_leave_nothing_behind() {
    let Some(db) = pg::database() else { return };
    let a = node(&db.url, "a");
    a.create(meta("c", T0)).await.expect("create");
    let lease = owned(&a, "c").await;
    a.release(&cid("c"), lease).await.expect("release");
    assert!(a.delete(&cid("c")).await.expect("delete"));
    let lease = owned(&a, "nothing-here").await;
    a.release(&cid("nothing-here"), lease)
        .await
        .expect("release");
    assert!(db.query("SELECT * FROM ownership").is_empty());
}
