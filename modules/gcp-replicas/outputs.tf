output "replicas" {
  description = "Per replica ID: endpoint (http://IP:PORT: the internal IP when ingress is private only or external_ip is false, else the external IP when there is one), cloud_id (the instance's server-assigned ID: a new one when a VM is recreated under the same name), self_link, name, network, private_ip, public_ip, zone and market."
  value = {
    for id, inst in google_compute_instance.replica : id => {
      endpoint   = try("http://${var.private_endpoint ? inst.network_interface[0].network_ip : coalesce(try(inst.network_interface[0].access_config[0].nat_ip, ""), inst.network_interface[0].network_ip)}:${var.port}", null)
      cloud_id   = try(inst.instance_id, null)
      self_link  = try(inst.self_link, null)
      name       = try(inst.name, null)
      private_ip = try(inst.network_interface[0].network_ip, null)
      public_ip  = try(inst.network_interface[0].access_config[0].nat_ip, null)
      zone       = try(inst.zone, null)
      network    = try(inst.network_interface[0].network, null)
      market     = try(var.replicas[id].market, null)
    }
  }
}

output "firewall" {
  description = "The firewall rule opening the model server port."
  value       = try(google_compute_firewall.replicas.name, null)
}
