//! The one module of `runtime/` that knows the actor library (actix): a conversation actor's
//! address as a [`SignalTarget`], through the [`FromRuntime`] message it handles.

use std::future::Future;
use std::pin::Pin;

use actix::prelude::*;

use super::{RuntimeSignal, SignalTarget};

/// A runtime's signal, as a message to its conversation actor.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct FromRuntime(pub RuntimeSignal);

impl SignalTarget for Recipient<FromRuntime> {
    fn send(&self, signal: RuntimeSignal) {
        self.do_send(FromRuntime(signal));
    }

    fn deliver(&self, signal: RuntimeSignal) -> Pin<Box<dyn Future<Output = bool>>> {
        let sent = Recipient::send(self, FromRuntime(signal));
        Box::pin(async move { sent.await.is_ok() })
    }
}
