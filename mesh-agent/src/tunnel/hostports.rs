//! Host-port endpoints: tasks in bridge network mode are reached at `<node ip>:<host port>`
//! (what Cloud Map SRV records and Docker port publishing give out), so their tunnel lands on
//! the agent's listener in the node's own netns. This registry maps a host port to the task
//! that published it, and a TLS server name to the certificate of the identity the client
//! expects (the client names it in SNI, see `tls::server_name_for`).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::certs::WorkloadSlot;
use crate::netns::NetnsWorker;

/// The task behind a host port.
pub struct HostPortOwner {
    pub task_id: Arc<str>,
    pub family: Option<Arc<str>>,
    pub version: Option<Arc<str>>,
    pub slot: Arc<WorkloadSlot>,
    pub netns: Arc<NetnsWorker>,
    /// Where the task listens inside its own netns.
    pub container_port: u16,
}

#[derive(Default)]
pub struct HostPorts(RwLock<HashMap<u16, Arc<HostPortOwner>>>);

impl HostPorts {
    /// Replaces the host ports of `task_id` (`(host port, container port)` pairs).
    pub fn set_task(
        &self,
        task_id: &Arc<str>,
        (family, version): (Option<&Arc<str>>, Option<&Arc<str>>),
        slot: &Arc<WorkloadSlot>,
        netns: &Arc<NetnsWorker>,
        ports: &[(u16, u16)],
    ) {
        let mut map = self.0.write().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, o| o.task_id != *task_id);
        for &(host, container) in ports {
            map.insert(
                host,
                Arc::new(HostPortOwner {
                    task_id: task_id.clone(),
                    family: family.cloned(),
                    version: version.cloned(),
                    slot: slot.clone(),
                    netns: netns.clone(),
                    container_port: container,
                }),
            );
        }
    }

    pub fn remove_task(&self, task_id: &str) {
        let mut map = self.0.write().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, o| &*o.task_id != task_id);
    }

    pub fn owner(&self, host_port: u16) -> Option<Arc<HostPortOwner>> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&host_port)
            .cloned()
    }

    /// The certificate slot for the identity a client named in SNI.
    pub fn slot_for_server_name(&self, name: &str) -> Option<Arc<WorkloadSlot>> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .find(|o| super::tls::server_name_for(o.slot.id()) == name)
            .map(|o| o.slot.clone())
    }
}
