//! Taking over the conversations of a cluster node that died.
//!
//! A node that dies (or is fenced) holding conversations leaves their ownership rows behind,
//! under a registration that expires. Every heartbeat, a live node asks the store for a few
//! such conversations ([`Store::orphaned`], in random order so that nodes sweeping at once
//! spread them) and starts each one here as `POST …/start` would: acquiring it (one node wins;
//! the others find it owned and leave it), loading its log and starting its runtime. So a
//! crashed owner's conversations run again elsewhere within `node_ttl_ms` + one heartbeat
//! whether or not a client asks for them — an agent in the middle of a task goes on.
//!
//! Promises: at most [`BATCH`] conversations per heartbeat; nothing while the node is not
//! live; a conversation refused by admission (the node's running limit, the user's limit) is
//! left for another node or a later sweep; the sweep ends with the supervisor. Single-node
//! stores have no orphans, so the sweep never starts there. "took over a conversation its
//! lapsed owner held" is logged (info) only when the sweep itself brought the conversation up
//! and acquired it; one it finds live on this node already (a request here brought it up
//! first) is left as it is, at debug level.

use std::sync::Arc;
use std::time::Duration;

use tracing::Instrument;

use super::handle::SupervisorHandle;
use super::messages::{Admit, AdmitError, AdmitMode, ConversationError, OpenError};
use crate::store::{Membership, Store};

/// At most this many conversations are taken over per heartbeat.
pub const BATCH: usize = 16;

/// Starts the sweep on the current actix system, every `every`, when `store` is a cluster's.
pub fn start(supervisor: SupervisorHandle, store: Arc<dyn Store>, every: Duration) {
    let Some(membership) = store.membership() else {
        return;
    };
    actix::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if !matches!(*membership.borrow(), Membership::Live { .. }) {
                continue;
            }
            let orphans = match store.orphaned(BATCH).await {
                Ok(orphans) => orphans,
                Err(e) => {
                    tracing::debug!(error = %e, "takeover sweep: cannot list orphaned conversations");
                    continue;
                }
            };
            for orphan in orphans {
                let span = tracing::info_span!("takeover", conversation = %orphan.id);
                let request = Admit {
                    id: orphan.id.clone(),
                    mode: AdmitMode::LoadOnly,
                    client: None,
                    owner: orphan.owner,
                    brought_initial_message: false,
                };
                // Whether this sweep brought it up (and so acquired it), not found it live.
                let opened = supervisor
                    .open(request, |mut admitted| async move {
                        let started = admitted.started();
                        admitted.loaded().await.map(|()| started)
                    })
                    .instrument(span.clone())
                    .await;
                let _entered = span.enter();
                match opened {
                    Ok(true) => tracing::info!("took over a conversation its lapsed owner held"),
                    // A request on this node brought it up first: nothing taken over here.
                    Ok(false) => tracing::debug!("an orphaned conversation is live here already"),
                    Err(OpenError::Admit(AdmitError::ShuttingDown)) => return,
                    // Another node was quicker, or it was deleted meanwhile.
                    Err(OpenError::Conversation(
                        ConversationError::Elsewhere(_) | ConversationError::NotFound,
                    )) => {}
                    Err(e) => tracing::warn!(error = %e, "cannot take over a conversation"),
                }
            }
        }
    });
}
