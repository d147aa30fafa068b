//! One module per scenario, each implementing [`crate::scenario::Scenario`];
//! [`crate::catalog`] lists them in report order.

pub mod bigconn;
pub mod churn;
pub mod connrate;
pub mod discover;
pub mod drain;
pub mod failure;
pub mod idle;
pub mod l4;
pub mod micro;
pub mod propagate;
pub mod push;
pub mod steady;
pub mod storm;
pub mod upgrade;
