//! Routing: choosing which endpoint of a meshed service a connection goes to.
//!
//! The outbound proxy knows the original destination the application connected to and, for
//! a service discovered through DNS, the service's current endpoint set. [`outlier`] is the
//! passive health check between the two: endpoints that just refused or dropped a
//! connection are ejected for a while, so the next connections go to their healthy peers
//! long before DNS (TTL 60 s on Cloud Map) or the control plane notices.

#[allow(dead_code)] // accessors for routing by Host/:authority and gRPC retry codes come next
pub mod budget;
#[allow(dead_code)] // accessors for routing by Host/:authority and gRPC retry codes come next
pub mod model;
pub mod outlier;
#[allow(dead_code)] // accessors for routing by Host/:authority and gRPC retry codes come next
pub mod overrides;
#[allow(dead_code)] // accessors for routing by Host/:authority and gRPC retry codes come next
pub mod table;
#[allow(dead_code)] // accessors for routing by Host/:authority and gRPC retry codes come next
pub mod validate;
