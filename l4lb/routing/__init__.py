"""Scale-out routing (README: VRRP or ECMP): l4lb decides which VIPs are announced, FRR speaks BGP.

- frr.py: FRR config text (the node's bgpd/bfdd/zebra, the lab router) and vtysh
  queries (session status as JSON);
- announce.py: which VIP addresses to announce (sans-I/O) and the host routes that
  carry the decision to FRR (pyroute2, main table, dev lo, protocol 250);
- service.py: the daemon's asyncio shell: join gate, drain, session watch, metrics.

The node's FRR redistributes kernel routes via lo (route-map L4LB-VIPS, match
interface lo): a route l4lb adds is announced, one it removes is withdrawn, and
an FRR restart re-reads them from the kernel.
"""
