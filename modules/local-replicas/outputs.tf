output "replicas" {
  description = "Per replica ID: endpoint (http://127.0.0.1:PORT), cloud_id (the launch's Terraform ID, new on every replacement), zone, market and port."
  value = {
    for id, r in terraform_data.replica : id => {
      endpoint = try("http://127.0.0.1:${var.replicas[id].port}", null)
      cloud_id = try(r.id, null)
      zone     = try(var.replicas[id].zone, null)
      market   = try(var.replicas[id].market, null)
      port     = try(var.replicas[id].port, null)
    }
  }
}

output "runtime_dir" {
  description = "Where the replicas' pid files (replicas/ID.json) and logs (replicas/ID.log) live."
  value       = try(var.runtime_dir, null)
}
