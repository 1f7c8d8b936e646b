//! A value made from each path a provider sends to, kept for the few fixed paths.

use std::sync::RwLock;

/// Values kept per path: at most this many paths; paths beyond them (ones carrying
/// ids) are made each time.
const MAX_PATHS: usize = 8;

/// What is made from each path a provider sends to (a parsed URL, a request URI), made
/// once for the first [`MAX_PATHS`] paths: making one costs more than the rest of
/// building a request, and a provider posts to a handful of fixed paths.
#[derive(Debug)]
pub(super) struct PathCache<T>(RwLock<Vec<(Box<str>, T)>>);

impl<T> Default for PathCache<T> {
    fn default() -> Self {
        PathCache(RwLock::new(Vec::new()))
    }
}

impl<T: Clone> PathCache<T> {
    /// The value for `path`: the one kept, else `make(path)`'s, kept if there is room.
    pub(super) fn get_or_make<E>(
        &self,
        path: &str,
        make: impl FnOnce(&str) -> Result<T, E>,
    ) -> Result<T, E> {
        let kept = |all: &[(Box<str>, T)]| {
            all.iter()
                .find(|(p, _)| **p == *path)
                .map(|(_, v)| v.clone())
        };
        let found = match self.0.read() {
            Ok(all) => kept(&all),
            Err(p) => kept(&p.into_inner()),
        };
        if let Some(v) = found {
            return Ok(v);
        }
        let v = make(path)?;
        let mut all = match self.0.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if all.len() < MAX_PATHS && kept(&all).is_none() {
            all.push((path.into(), v.clone()));
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_once_per_path_up_to_the_bound() {
        let cache = PathCache::<String>::default();
        let made = std::cell::Cell::new(0);
        let make = |p: &str| -> Result<String, ()> {
            made.set(made.get() + 1);
            Ok(format!("base{p}"))
        };
        assert_eq!(cache.get_or_make("/a", make), Ok("base/a".to_owned()));
        assert_eq!(cache.get_or_make("/a", make), Ok("base/a".to_owned()));
        assert_eq!(made.get(), 1, "kept after the first");
        for i in 0..MAX_PATHS + 3 {
            let p = format!("/p{i}");
            assert_eq!(cache.get_or_make(&p, make), Ok(format!("base{p}")));
        }
        let before = made.get();
        // "/a" and the first paths are kept; the ones past the bound are made again
        assert_eq!(cache.get_or_make("/a", make), Ok("base/a".to_owned()));
        let last = format!("/p{}", MAX_PATHS + 2);
        assert_eq!(cache.get_or_make(&last, make), Ok(format!("base{last}")));
        assert_eq!(made.get(), before + 1);
        assert_eq!(cache.0.read().map(|v| v.len()).unwrap_or(0), MAX_PATHS);
        // a failure is returned and nothing is kept for it
        let failing = PathCache::<String>::default();
        assert_eq!(
            failing.get_or_make("/x", |_| Err::<String, _>("bad")),
            Err("bad")
        );
        assert_eq!(failing.0.read().map(|v| v.len()).unwrap_or(1), 0);
    }
}
