//! A worker's webhook slots shared out between projects: one tenant's
//! slow receivers cannot hold every slot while other tenants' events wait.

/// The webhook slots each project's endpoints hold in this worker (`None`:
/// endpoints of every project), each at most `cap`.
#[derive(Debug)]
pub struct Shares {
    held: std::sync::Mutex<std::collections::HashMap<Option<i64>, usize>>,
    cap: usize,
}

/// One slot of a project's share, given back when dropped.
pub struct Share<'a> {
    shares: &'a Shares,
    project: Option<i64>,
}

impl Shares {
    pub fn new(cap: usize) -> Self {
        Shares {
            held: Default::default(),
            cap: cap.max(1),
        }
    }

    /// A slot of `project`'s share, unless it holds all of it.
    pub fn take(&self, project: Option<i64>) -> Option<Share<'_>> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let n = held.entry(project).or_default();
        if *n >= self.cap {
            return None;
        }
        *n += 1;
        Some(Share {
            shares: self,
            project,
        })
    }
}

impl Drop for Share<'_> {
    fn drop(&mut self) {
        let mut held = self.shares.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = held.get_mut(&self.project) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(&self.project);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_project_holds_at_most_its_share_and_gives_it_back() {
        let shares = Shares::new(2);
        let a1 = shares.take(Some(1)).expect("first");
        let _a2 = shares.take(Some(1)).expect("second");
        assert!(shares.take(Some(1)).is_none(), "past the share");
        let _b = shares.take(Some(2)).expect("another project");
        let _all = shares.take(None).expect("endpoints of every project");
        drop(a1);
        assert!(shares.take(Some(1)).is_some(), "given back");
    }
}
