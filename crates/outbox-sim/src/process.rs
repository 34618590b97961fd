//! A simulated process: everything it does to the world outside (a store
//! call, a publish) goes through [`Process::io`], which is how it dies or
//! freezes. A dead process's calls never leave it; a frozen one's leave
//! when it thaws, with whatever it decided before (a GC pause longer than
//! its lease).

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Life {
    Alive,
    Frozen(Instant),
    Dead,
}

pub struct Process {
    name: String,
    life: watch::Sender<Life>,
}

impl Process {
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            life: watch::Sender::new(Life::Alive),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Waits until the process may act on the world: at once when alive,
    /// at the thaw when frozen, never when dead.
    pub async fn io(&self) {
        let mut changes = self.life.subscribe();
        loop {
            let life = *changes.borrow_and_update();
            match life {
                Life::Alive => return,
                Life::Dead => {
                    // Parked for good: the simulation drops the task.
                    let _ = changes.changed().await;
                    std::future::pending::<()>().await;
                }
                Life::Frozen(until) => {
                    if Instant::now() >= until {
                        self.life.send_if_modified(|l| {
                            let thawed = *l == Life::Frozen(until);
                            if thawed {
                                *l = Life::Alive;
                            }
                            thawed
                        });
                        continue;
                    }
                    tokio::select! {
                        biased;
                        () = tokio::time::sleep_until(until) => {}
                        _ = changes.changed() => {}
                    }
                }
            }
        }
    }

    pub fn kill(&self) {
        self.life.send_replace(Life::Dead);
    }

    pub fn freeze(&self, length: Duration) {
        self.life.send_if_modified(|l| {
            let alive = *l == Life::Alive;
            if alive {
                *l = Life::Frozen(Instant::now() + length);
            }
            alive
        });
    }

    /// Alive and not frozen: it can act now.
    pub fn is_active(&self) -> bool {
        *self.life.borrow() == Life::Alive
    }

    pub fn is_dead(&self) -> bool {
        *self.life.borrow() == Life::Dead
    }
}
