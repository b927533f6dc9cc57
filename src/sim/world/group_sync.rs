//! Each region's gateway, group offsets: the production `mirror::core::offsets` shipping and
//! clamping committed offsets.

use crate::mirror::core::offsets;
use crate::sim::scenario::TOPIC;

use super::*;

impl World {
    // ---- the gateway: group offset sync (production: `mirror::core::offsets`) -------------

    pub(super) fn offset_sync(&mut self, r: usize) {
        for peer in self.peers(r) {
            if self.ships(r, peer).is_none() {
                continue;
            }
            let groups: Vec<(u32, Vec<i64>)> = self.regions[r]
                .groups
                .iter()
                .map(|(g, v)| (*g, v.clone()))
                .collect();
            for (group, entries) in groups {
                self.send(r, peer, Msg::Offsets { group, entries });
            }
        }
        let d = self.local_delay(r, offsets::OFFSET_SYNC_INTERVAL_MS);
        let inc = self.regions[r].incarnation;
        self.after(d, Ev::OffsetSync(r, inc));
    }

    /// `install_offsets`: `offsets::wanted` and `offsets::clamped` against the primary's last
    /// heartbeat and this mirror's logs.
    pub(super) fn on_offsets(&mut self, m: usize, src: usize, group: u32, entries: Vec<i64>) {
        let p = self.placement(m);
        let src_name = self.regions[src].name.clone();
        let me = self.regions[m].name.clone();
        let entries = entries
            .iter()
            .enumerate()
            .map(|(i, o)| (TOPIC.to_string(), i as i32, *o))
            .collect();
        let wanted = offsets::wanted(entries, |_| {
            p.primary == src_name && p.mirrors.contains(&me)
        });
        let primary = self.regions[m]
            .live
            .reports()
            .get(&src_name)
            .map(|r| r.heartbeat.clone());
        let commit = offsets::clamped(wanted, primary.as_ref(), &self.offsets_of(m));
        let nparts = self.nparts;
        for (_, parts) in commit {
            let v = self.regions[m]
                .groups
                .entry(group)
                .or_insert_with(|| vec![0; nparts]);
            for (i, o) in parts {
                v[i as usize] = o;
            }
        }
    }
}
