//! The gRPC services' shared state.

use std::sync::Arc;

use crate::{AuditLog, Batches, Firmware, Fleet, Monitoring, People, Recipes, Rollouts, Trust};

/// Closes a device's live connection (the embedded broker); returns whether one was open.
#[tonic::async_trait]
pub trait Disconnect: Send + Sync + 'static {
    async fn disconnect(&self, device_id: &str) -> bool;
}

/// What the `nanofleet.v1` services act on; cheap to clone.
#[derive(Clone)]
pub struct Api {
    pub fleet: Fleet,
    pub trust: Trust,
    pub people: People,
    pub audit: AuditLog,
    pub recipes: Recipes,
    pub batches: Batches,
    pub monitoring: Monitoring,
    pub firmware: Firmware,
    pub rollouts: Rollouts,
    pub inventory: crate::Inventory,
    /// Closes a device's broker connection (the embedded broker; none with an external one).
    pub disconnect: Option<Arc<dyn Disconnect>>,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api").field("trust", &self.trust).finish_non_exhaustive()
    }
}

impl Api {
    pub(crate) async fn disconnect(&self, device_id: &str) -> bool {
        match &self.disconnect {
            Some(d) => d.disconnect(device_id).await,
            None => false,
        }
    }
}
